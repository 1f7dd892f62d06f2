"""MLflow logging, the summary table and the plots (score vs embedding dim, score vs context length)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow 3's UI shows an experiment either as GenAI (traces, sessions) or as model training (runs, metric charts).
# The experiment tag is what MLflow itself sets when a user picks the kind in the UI; 3.17's sidebar switch (kept
# per browser) overrides it, and the ``workflowType`` URL parameter overrides both (`ui_path`).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
_MRL = re.compile(r"^mrl/(?P<dim>\d+|binary)/(?P<name>.+)$")
_LOCO = re.compile(r"^(?P<name>(?:loco|jina)/.+)/(?P<length>\d+)$")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else MLflow's own default (``sqlite:///mlflow.db`` in the working directory).

    Never set globally here: a caller's active run (the pipeline's) must stay on the store it was started in.
    """
    import mlflow

    return mlflow.get_tracking_uri() or DEFAULT_TRACKING_URI


def artifact_location(uri: str, experiment: str) -> str | None:
    """Next to a sqlite store (``<db dir>/mlartifacts/<experiment>``); a server decides for itself."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    database = Path(uri[len("sqlite:///") :])
    return (database.parent.resolve() / "mlartifacts" / experiment).as_uri()


def experiment_id(experiment: str, location: str | None = None) -> str:
    """The experiment's id, created if missing with ``location`` or an artifact location beside a sqlite store
    (never ./mlruns of whatever the working directory happens to be), marked as a model-training experiment."""
    import mlflow

    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        location = location or artifact_location(mlflow.get_tracking_uri(), experiment)
        return mlflow.create_experiment(experiment, location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    if EXPERIMENT_KIND_TAG not in found.tags:  # an experiment made before the tag; a user's own choice is kept
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return found.experiment_id


# How a run looks in the runs table: MLflow's own tags. The UI opens (expands) the parent of every run tagged
# ``mlflow.runType=evaluation``; the evaluate stage run and the per-model evaluation runs carry it, so the
# pipeline's parent and the evaluate stage open by themselves and every stage and evaluation run is listed.
RUN_TYPE_TAG = "mlflow.runType"
RUN_COLOR_TAG = "mlflow.runColor"
RUN_COLORS = {"pipeline": "#111827", "data": "#6b7280", "trainer": "#2563eb", "evaluate": "#059669"}


def run_look(kind: str, evaluation: bool = False) -> dict[str, str]:
    """MLflow tags for a run of ``kind`` (a `RUN_COLORS` key, or "" for no fixed colour; evaluation runs keep
    MLflow's own colours so that their charts tell them apart)."""
    tags = {RUN_COLOR_TAG: RUN_COLORS[kind]} if kind else {}
    return {**tags, RUN_TYPE_TAG: "evaluation"} if evaluation else tags


def ui_path(experiment: str) -> str:
    """The MLflow UI address (after the server's root) of an experiment's runs table, in the model-training view
    whatever the browser last used."""
    return f"#/experiments/{experiment}/runs?workflowType=machine_learning"


@contextlib.contextmanager
def mlflow_run(experiment: str, run_name: str | None, run_id: str | None = None) -> Iterator[Any]:
    """The active run if there is one (a pipeline's child run), ``run_id`` if given, else a new run."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and (run_id is None or active.info.run_id == run_id):
        yield active
        return
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name) as run:
        yield run


def format_table(metrics: Mapping[str, float], columns: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Markdown table, scores x100 with 2 decimals; ``columns`` gives a side-by-side table of several runs."""
    columns = columns if columns is not None else {"value": metrics}
    names = sorted({name for values in columns.values() for name in values})
    width = max([len("metric")] + [len(n) for n in names])
    lines = ["| " + "metric".ljust(width) + " | " + " | ".join(columns) + " |",
             "|" + "-" * (width + 2) + "|" + "|".join("-" * (len(c) + 2) for c in columns) + "|"]  # fmt: skip
    for name in names:
        cells = []
        for column, values in columns.items():
            value = values.get(name)
            cells.append(("" if value is None else f"{100 * value:.2f}").rjust(len(column)))
        lines.append("| " + name.ljust(width) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dims_series(metrics: Mapping[str, float], full_dim: int, label: str = "", only: Callable[[str], bool] = bool,
                ) -> tuple[dict[str, dict[int, float]], dict[str, float]]:  # fmt: skip
    """``mrl/<dim>/<name>`` metrics -> ({name: {dim: score}} with the full-dim score at ``full_dim``,
    {name: binary score}); names prefixed with ``label`` when given, and kept when ``only(name)``."""
    series: dict[str, dict[int, float]] = {}
    binary: dict[str, float] = {}
    for key, value in metrics.items():
        match = _MRL.match(key)
        if not match or not only(match["name"]):
            continue
        name = f"{label} {match['name']}" if label else match["name"]
        if match["dim"] == "binary":
            binary[name] = value
        else:
            series.setdefault(name, {})[int(match["dim"])] = value
            if match["name"] in metrics and full_dim > 0:
                series[name][full_dim] = metrics[match["name"]]
    return series, binary


def plot_dims(metrics: Mapping[str, float], full_dim: int, file: Path) -> bool:
    """One line per score over the Matryoshka dims (the full-dim score at ``full_dim``); binary as a marker."""
    return _draw_dims(*dims_series(metrics, full_dim), full_dim, file)


def plot_dims_by_model(results: Mapping[str, Mapping[str, float]], full_dims: Mapping[str, int], file: Path) -> bool:
    """The suite averages (``beir/avg_ndcg_at_10``, ``sts/avg_spearman``...) of every model over its dims."""
    series: dict[str, dict[int, float]] = {}
    binary: dict[str, float] = {}
    for label, metrics in results.items():
        found, flips = dims_series(metrics, full_dims.get(label, 0), label, only=lambda name: "/avg_" in name)
        series.update(found)
        binary.update({name: value for name, value in flips.items() if name in found})
    return _draw_dims(series, binary, max(full_dims.values(), default=0), file)


def _draw_dims(series: dict[str, dict[int, float]], binary: dict[str, float], full_dim: int, file: Path) -> bool:
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        dims = sorted(points)
        (line,) = ax.plot(dims, [points[d] for d in dims], marker="o", label=name)
        if name in binary:
            ax.scatter([max(dims)], [binary[name]], marker="x", color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dimension (x = binary at full dim)")
    ax.set_ylabel("score")
    ax.set_title("score against embedding dimension")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(histories: Mapping[str, Mapping[int, float]], file: Path) -> bool:
    """One panel per training stage: its loss against the step."""
    histories = {stage: points for stage, points in histories.items() if points}
    if not histories:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(histories), figsize=(3.6 * len(histories) + 1, 3.6), squeeze=False)
    for ax, (stage, points) in zip(axes[0], histories.items(), strict=True):
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], marker="." if len(steps) < 50 else None)
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
    return True


def log_loss_curves(runs: Mapping[str, str], name: str) -> None:
    """The ``<stage>/loss`` history of each stage's run (``{stage: run_id}``) as one figure on the active run."""
    import mlflow

    client = mlflow.MlflowClient()
    histories = {stage: {m.step: m.value for m in client.get_metric_history(run_id, f"{stage}/loss")}
                 for stage, run_id in runs.items()}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        if plot_loss_curves(histories, Path(folder) / name):
            mlflow.log_artifact(str(Path(folder) / name))


def write_evaluation_figures(results: Mapping[str, Mapping[str, float]], full_dims: Mapping[str, int],
                             folder: Path) -> list[Path]:  # fmt: skip
    """``evaluation_table.md`` (models side by side) and, when a model was scored at several dims,
    ``score_vs_dim.png`` (its suite averages over the dims) in ``folder``; returns the files written."""
    files = [folder / "evaluation_table.md"]
    files[0].write_text(format_table({}, results) + "\n")
    if plot_dims_by_model(results, full_dims, folder / "score_vs_dim.png"):
        files.append(folder / "score_vs_dim.png")
    return files


def log_evaluation_table(results: Mapping[str, Mapping[str, float]]) -> None:
    """The side-by-side table as an MLflow table artifact (``evaluation_table.json``: the UI shows it as a grid)."""
    import mlflow

    names = sorted({name for metrics in results.values() for name in metrics})
    columns = {label: [metrics.get(name) for name in names] for label, metrics in results.items()}
    mlflow.log_table({"metric": names, **columns}, artifact_file="evaluation_table.json")


def plot_lengths(metrics: Mapping[str, float], file: Path) -> bool:
    """One line per long-context score over the context lengths."""
    series: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        match = _LOCO.match(key)
        if match:
            series.setdefault(match["name"], {})[int(match["length"])] = value
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        lengths = sorted(points)
        ax.plot(lengths, [points[n] for n in lengths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score")
    ax.set_title("score against context length")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return True


def log_results(metrics: Mapping[str, float], params: Mapping[str, Any], full_dim: int) -> None:
    """Metrics, params (values clipped to MLflow's 6000 chars), the summary table/JSON and plots to the active run.

    MLflow params are write-once: a param the run already has (a second evaluation in one pipeline run) is kept,
    and a differing value is only warned about.
    """
    import mlflow

    mlflow.log_metrics(dict(metrics))
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    fresh = {k: str(v)[:6000] for k, v in params.items()}
    for key in sorted(k for k in fresh if k in existing and existing[k] != fresh[k]):
        log.warning("MLflow param %s already %r in this run; not overwritten with %r", key, existing[key], fresh[key])
    mlflow.log_params({k: v for k, v in fresh.items() if k not in existing})
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        (out / "summary.md").write_text(format_table(metrics) + "\n")
        (out / "summary.json").write_text(json.dumps({"metrics": dict(metrics), "params": dict(params)}, indent=2,
                                                     default=str))  # fmt: skip
        plot_dims(metrics, full_dim, out / "score_vs_dim.png")
        plot_lengths(metrics, out / "score_vs_context_length.png")
        mlflow.log_artifacts(folder)
