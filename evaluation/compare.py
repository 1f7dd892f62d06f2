"""``python -m evaluation.compare [RUN_ID ...] [--experiment NAME] [--filter PREFIX]``: runs side by side.

The metric names are the same in every run, so the MLflow UI's "Compare" view shows the same table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from evaluation.report import format_table, tracking_uri


def collect(run_ids: Sequence[str] = (), experiment: str | None = None,
            prefix: str = "") -> dict[str, dict[str, float]]:  # fmt: skip
    """{column label (run name + short id): {metric: value}} for the given runs, or every run of ``experiment``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = [client.get_run(run_id) for run_id in run_ids]
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise SystemExit(f"no MLflow experiment {experiment!r} at {tracking_uri()}")
        runs += client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    columns: dict[str, dict[str, float]] = {}
    for item in runs:
        label = f"{item.info.run_name or 'run'} ({item.info.run_id[:8]})"
        columns[label] = {k: v for k, v in item.data.metrics.items() if k.startswith(prefix)}
    return columns


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.compare", description=__doc__.splitlines()[0])
    p.add_argument("run_ids", nargs="*", help="MLflow run ids")
    p.add_argument("--experiment", default=None, help="add every run of this experiment")
    p.add_argument("--filter", default="", help="only metrics starting with this prefix (e.g. beir/ or mrl/)")
    args = p.parse_args(argv)
    if not args.run_ids and args.experiment is None:
        p.error("give run ids and/or --experiment")
    columns = collect(args.run_ids, args.experiment, args.filter)
    print(format_table({}, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
