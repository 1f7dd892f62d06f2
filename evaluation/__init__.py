"""Evaluation: MTEB / BEIR / STS / GLUE / long-context / Matryoshka suites for our checkpoints and baselines,
every number logged to MLflow under a stable name (see docs/evaluation.md). Imports nomicbert and ops only."""

from evaluation.api import EvalConfig, run
from evaluation.data import DataError
from evaluation.glue import GlueConfig

__all__ = ["DataError", "EvalConfig", "GlueConfig", "run"]
