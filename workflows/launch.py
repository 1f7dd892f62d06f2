"""The driver side of a stage: `fit` wraps Ray Train's `TorchTrainer` over the per-epoch datasets and exports the
final model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workflows.checkpoints import PROGRESS_FILE, STATE_DIR, export_final
from workflows.ingest import epoch_datasets
from workflows.tracking import client_env, log_manifest, mlflow_run


def absolute_paths(config: Any) -> Any:
    """Local paths made absolute in the driver: Ray workers need not share its working directory."""
    import dataclasses

    def fix(value: str | None, must_exist: bool = False) -> str | None:
        if value is None or "://" in value or (must_exist and not Path(value).exists()):
            return value
        return str(Path(value).resolve())

    changes = {k: fix(getattr(config, k)) for k in ("data", "output_dir", "init_checkpoint") if hasattr(config, k)}
    if hasattr(config, "model"):
        changes["model"] = fix(config.model, must_exist=True)
    run = dataclasses.replace(config.run, row_log=fix(config.run.row_log))
    return dataclasses.replace(config, **changes, run=run)


def fit(stage: str, config: Any, loop: Callable[[dict], Any], datasets: list[Any], total_steps: int,
        kind: str, extra_loop_config: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``loop`` on ``config.run.num_workers`` Ray Train workers (DDP) over the per-epoch ``datasets``, export
    the final model, log it.

    Returns ``{"stage", "model" (the exported folder), "checkpoint" (Ray's last checkpoint), "steps", "metrics",
    "mlflow_run_id"}``.
    """
    import mlflow
    import ray.train
    from ray.train.torch import TorchTrainer

    from ops.config import to_dict

    config = absolute_paths(config)
    run = config.run
    ordered = ray.train.DataConfig.default_ingest_options()
    ordered.preserve_order = True
    resources = {"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})}
    with mlflow_run(stage, config, config.mlflow) as mlrun:
        log_manifest(config.data)
        trainer = TorchTrainer(
            loop,
            train_loop_config={"config": to_dict(config), "total_steps": total_steps, "mlflow": mlrun,
                               "num_epochs": len(datasets),
                               **(extra_loop_config or {})},
            scaling_config=ray.train.ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                                   resources_per_worker=resources),  # fmt: skip
            run_config=ray.train.RunConfig(
                name=run.name,
                storage_path=str(Path(run.storage_path).resolve()) if "://" not in run.storage_path else run.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
                worker_runtime_env={"env_vars": client_env()},  # rank 0 logs to MLflow with the driver's credentials
            ),
            datasets=epoch_datasets(datasets),
            # every worker reads the same ordered stream and keeps its slice of each global batch (exact resume)
            dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ordered),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        with result.checkpoint.as_directory() as folder:
            model_dir = export_final(Path(folder), config.output_dir, kind)
            progress = json.loads((Path(folder) / STATE_DIR / PROGRESS_FILE).read_text())
        mlflow.log_artifacts(str(model_dir), "model")
        return {"stage": stage, "model": str(model_dir), "checkpoint": result.checkpoint.path,
                "steps": progress["step"], "metrics": dict(result.metrics or {}), "mlflow_run_id": mlrun["run_id"]}
