"""Where a run came from, as MLflow tags: the code, the config, the data and the checkpoint behind it.

Every run of the pipeline carries ``run_kind`` (``pipeline``, ``stage`` or ``evaluation``) and

    lineage.git_commit          the commit of the code that ran ("+dirty" with uncommitted changes)
    lineage.config_fingerprint  the hash that decides whether a finished stage is re-used (`ops.config.fingerprint`)
    lineage.data.<stage>        sha256 (16 hex) of the manifest.json of each data set upstream of the run
    lineage.checkpoint          the model folder the run trained from or scored
    lineage.checkpoint_run      the MLflow run id of the stage run that produced that checkpoint

so ``tags.`lineage.checkpoint_run` = '<id>'`` in the MLflow search box finds everything built on one run.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from ops import io

GIT_COMMIT = "lineage.git_commit"
CONFIG_FINGERPRINT = "lineage.config_fingerprint"
CHECKPOINT = "lineage.checkpoint"
CHECKPOINT_RUN = "lineage.checkpoint_run"
DATA_PREFIX = "lineage.data."
RUN_KIND = "run_kind"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    return io.code_version()


def manifest_hash(folder: str) -> str:
    """sha256 of a data folder's manifest.json (its rows, sources, config and code version), 16 hex digits."""
    return hashlib.sha256(io.read_text(io.join(folder, "manifest.json")).encode()).hexdigest()[:16]


def run_tags(kind: str, config_fingerprint: str, upstream: dict[str, str] | None = None) -> dict[str, str]:
    """The tags every run gets, plus ``upstream`` (the data and checkpoint tags of what it reads)."""
    return {RUN_KIND: kind, GIT_COMMIT: git_commit(), CONFIG_FINGERPRINT: config_fingerprint, **(upstream or {})}


def product(stage: str, result: dict[str, Any], run_id: str, upstream: dict[str, str]) -> dict[str, str]:
    """The lineage a finished stage hands downstream: the data tags it read, plus its own data set's manifest hash
    (a data stage) or its checkpoint and run (a trainer)."""
    data = {k: v for k, v in upstream.items() if k.startswith(DATA_PREFIX)}
    if "model" in result:
        return {**data, CHECKPOINT: str(result["model"]), CHECKPOINT_RUN: run_id}
    if "output" in result and io.exists(io.join(str(result["output"]), "manifest.json")):
        return {**data, DATA_PREFIX + stage: manifest_hash(str(result["output"]))}
    return data


def data_of(products: list[dict[str, str]]) -> dict[str, str]:
    """The data tags of everything a stage reads."""
    return {k: v for p in products for k, v in p.items() if k.startswith(DATA_PREFIX)}


def started_from(checkpoint: str, trained: dict[str, dict[str, str]]) -> dict[str, str]:
    """The checkpoint tags of a run that starts from (or scores) ``checkpoint``: with its stage run when this
    pipeline trained it (``trained``: model folder -> that stage's product)."""
    return {CHECKPOINT: checkpoint, **({CHECKPOINT_RUN: trained[checkpoint][CHECKPOINT_RUN]}
                                       if checkpoint in trained else {})}  # fmt: skip
