"""A Ray job's entry point for tests/test_cluster_jobs.py: `python -m workflows.finetune` as a user runs it (so its
config class lives in ``__main__``, which the Ray Train worker cannot import), with its Ray Train loop wrapped by a
check that runs in each worker process: the worker's MLFLOW_TRACKING_URI is the server the job's runtime env named
(passed here as the first argument, independently of any environment).

    python tests/stage_job_checking_mlflow_uri.py http://127.0.0.1:5000 finetune.yaml
"""

from __future__ import annotations

import os
import runpy
import sys

from workflows import contrastive

EXPECTED = sys.argv[1]
stage_loop = contrastive.train_loop_per_worker


def loop_checking_mlflow_uri(loop_config: dict) -> dict:
    """Pickled by value (this is __main__), so the check runs in the Ray Train worker."""
    seen = os.environ.get("MLFLOW_TRACKING_URI")
    if seen != EXPECTED:
        raise AssertionError(f"Ray Train worker {os.getpid()} has MLFLOW_TRACKING_URI={seen!r}, not {EXPECTED!r}")
    print(f"Ray Train worker {os.getpid()}: MLFLOW_TRACKING_URI={seen}", flush=True)
    return stage_loop(loop_config)


if __name__ == "__main__":
    if "MLFLOW_TRACKING_URI" not in os.environ:
        raise SystemExit("the job's runtime env did not set MLFLOW_TRACKING_URI")
    contrastive.train_loop_per_worker = loop_checking_mlflow_uri  # `contrastive.run` looks it up at call time
    sys.argv = ["workflows.finetune", "--config", sys.argv[2]]
    runpy.run_module("workflows.finetune", run_name="__main__", alter_sys=True)  # = python -m workflows.finetune
