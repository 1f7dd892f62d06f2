"""The driver side of a stage: `fit` runs Ray Train's `TorchTrainer` fed by an `ingest.EpochFeeder` and exports the
final model."""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.console import library_level
from workflows import ingest
from workflows.checkpoints import PROGRESS_FILE, STATE_DIR, export_final
from workflows.optimization import NonFiniteStepsError
from workflows.tracking import check_reachable_from_workers, client_env, log_manifest, log_model, mlflow_run

log = logging.getLogger("workflows.train")


def absolute_paths(config: Any) -> Any:
    """Local paths made absolute in the driver: Ray workers need not share its working directory."""
    import dataclasses

    def fix(value: str | None, must_exist: bool = False) -> str | None:
        if value is None or "://" in value or (must_exist and not Path(value).exists()):
            return value
        return str(Path(value).resolve())

    changes = {k: fix(getattr(config, k)) for k in ("data", "output_dir") if hasattr(config, k)}
    for key in ("model", "init_checkpoint"):  # a Hub id or an alias stays as it is
        if hasattr(config, key):
            changes[key] = fix(getattr(config, key), must_exist=True)
    run = dataclasses.replace(config.run, row_log=fix(config.run.row_log))
    return dataclasses.replace(config, **changes, run=run)


NOT_RETRIED = "not_retried_error"


def stop_without_retry(loop: Callable[[dict], Any], loop_config: dict[str, Any]) -> Any:
    """Run a worker's loop; a `NonFiniteStepsError` (deterministic: the same weights and data fail again) ends it
    normally with the message, which `fit` raises, instead of letting Ray Train retry it ``max_failures`` times."""
    try:
        return loop(loop_config)
    except NonFiniteStepsError as err:
        return {NOT_RETRIED: str(err)}


def fit(stage: str, config: Any, loop: Callable[[dict], Any], epochs: ingest.Epochs, schedule: ingest.Schedule,
        kind: str, extra_loop_config: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``loop`` on ``config.run.num_workers`` Ray Train workers (DDP/FSDP) for ``schedule.total_steps`` global
    batches of ``epochs``, each worker fed its own rows by an `ingest.EpochFeeder`; export the final model, log it.

    Returns ``{"stage", "model" (the exported folder), "checkpoint" (Ray's last checkpoint), "steps", "metrics",
    "mlflow_run_id"}``.
    """
    import mlflow
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from evaluation.report import log_loss_curves
    from ops.config import to_dict
    from ops.io import is_remote, resolve, upload_folder

    config = absolute_paths(config)
    run = config.run
    world = max(1, run.num_workers)
    resources = {"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {}), **run.worker_resources}
    log.info("[%s] %s, %d worker(s)", stage, schedule.describe(), world)
    # checkpoints and run state under the storage root, through the same pyarrow filesystem as every other output
    storage_filesystem, storage_path = resolve(run.storage_path)
    feeder_name = f"feeder-{run.name}-{uuid.uuid4().hex[:8]}"
    feeder = ingest.start_feeder(epochs, world, schedule.epochs, feeder_name, run.data_resources)
    try:
        held_out = epochs.held_out_rows()  # read once here; every worker (and a restarted one) gets it from the store
        with mlflow_run(stage, config, config.mlflow) as mlrun:
            check_reachable_from_workers(mlrun["tracking_uri"])
            log_manifest(config.data)
            mlflow.set_tags({f"{stage}.epochs": schedule.epochs, f"{stage}.steps_per_epoch": schedule.batches_per_epoch,
                             f"{stage}.total_steps": schedule.total_steps})  # fmt: skip
            if held_out is not None:  # which rows the val/ metrics score (and training never sees)
                mlflow.set_tag(f"{stage}.validation_rows", len(held_out["row_id"]))
                mlflow.log_dict({"row_id_ranges": epochs.held_out}, "validation/held_out.json")
            trainer = TorchTrainer(
                functools.partial(stop_without_retry, loop),
                train_loop_config={"config": to_dict(config), "mlflow": mlrun, "feeder": feeder_name,
                                   "total_steps": schedule.total_steps,
                                   "batches_per_epoch": schedule.batches_per_epoch,
                                   "validation": None if held_out is None else ray.put(held_out),
                                   **(extra_loop_config or {})},
                scaling_config=ray.train.ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                                       resources_per_worker=resources),  # fmt: skip
                run_config=ray.train.RunConfig(
                    name=run.name,
                    storage_path=storage_path,
                    storage_filesystem=storage_filesystem,
                    failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
                    # rank 0 logs to the driver's tracking server (from the job's runtime env) with its login
                    worker_runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": mlrun["tracking_uri"], **client_env()}},
                    # Ray Train's own INFO lines (worker group start, checkpoint reports) to its log files only
                    logging_config=ray.train.LoggingConfig(log_level=library_level()),
                ),
            )
            result = trainer.fit()
            if result.error is not None:
                raise result.error
            if isinstance(result.return_value, dict) and NOT_RETRIED in result.return_value:
                raise NonFiniteStepsError(f"[{stage}] {result.return_value[NOT_RETRIED]}")
            with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as scratch:
                remote = is_remote(config.output_dir)  # exported here, then uploaded to the storage root
                model_dir = export_final(Path(folder), str(Path(scratch) / "model") if remote else config.output_dir,
                                         kind)  # fmt: skip
                progress = json.loads((Path(folder) / STATE_DIR / PROGRESS_FILE).read_text())
                registered = log_model(Path(model_dir), kind, config.mlflow.registered_model)
                log_loss_curves({stage: mlrun["run_id"]}, "loss_curve.png")
                if remote:
                    upload_folder(model_dir, config.output_dir)
            return {"stage": stage, "model": config.output_dir, "registered_model": registered,
                    "checkpoint": result.checkpoint.path,
                    "steps": progress["step"], "metrics": dict(result.metrics or {}), "mlflow_run_id": mlrun["run_id"]}
    finally:
        ray.kill(feeder)
