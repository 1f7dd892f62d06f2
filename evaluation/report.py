"""MLflow logging, the summary table and the plots (score vs embedding dim, score vs context length)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
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
    (never ./mlruns of whatever the working directory happens to be)."""
    import mlflow

    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(experiment,
                                    artifact_location=location or artifact_location(mlflow.get_tracking_uri(), experiment))


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


def plot_dims(metrics: Mapping[str, float], full_dim: int, file: Path) -> bool:
    """One line per score over the Matryoshka dims (the full-dim score at ``full_dim``); binary as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {}
    binary: dict[str, float] = {}
    for key, value in metrics.items():
        match = _MRL.match(key)
        if not match:
            continue
        name = match["name"]
        if match["dim"] == "binary":
            binary[name] = value
        else:
            series.setdefault(name, {})[int(match["dim"])] = value
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        if name in metrics and full_dim > 0:
            points = {**points, full_dim: metrics[name]}
        dims = sorted(points)
        (line,) = ax.plot(dims, [points[d] for d in dims], marker="o", label=name)
        if name in binary and full_dim > 0:
            ax.scatter([full_dim], [binary[name]], marker="x", color=line.get_color())
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


def plot_lengths(metrics: Mapping[str, float], file: Path) -> bool:
    """One line per long-context score over the context lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        match = _LOCO.match(key)
        if match:
            series.setdefault(match["name"], {})[int(match["length"])] = value
    if not series:
        return False
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
