"""Long-context retrieval (LoCo-style: query -> long document) at several context lengths.

A Nomic model is loaded with dynamic NTK (spec §2, a=2 by default) so lengths past its trained 2048
positions stay usable; each length re-encodes the corpus truncated to that many tokens. Online, the Jina
long-context MTEB tasks run the same way through `mteb`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluation.data import DataError, RetrievalData, load_beir, load_qmsum, task_name
from evaluation.encoders import ModelSpec, RayPool, TextEncoder, load_encoder
from evaluation.retrieval import evaluate_retrieval

log = logging.getLogger(__name__)

JINA_TASKS = ("NarrativeQARetrieval", "WikiCitiesClustering", "SciFact", "BigPatentClustering")
JINA_LENGTHS = (128, 512, 8191)


def load_long_task(path: str | Path, limit: int | None = None) -> RetrievalData:
    """A QMSum jsonl (or folder holding ``test.jsonl``) or a BEIR folder of long documents."""
    path = Path(path)
    if (path / "corpus.jsonl").is_file():
        return load_beir(path, limit_queries=limit)
    if path.suffix == ".jsonl" or (path / "test.jsonl").is_file():
        return load_qmsum(path, name=task_name(path.parent if path.is_file() else path), limit_meetings=limit)
    raise DataError(f"{path}: not a long-context task (expected a BEIR folder or a QMSum test.jsonl)")


def long_context_encoder(source: str, max_length: int, rotary_scaling_factor: float | None,
                         device: str | None = None, pool: RayPool | None = None) -> TextEncoder:  # fmt: skip
    return load_encoder(ModelSpec(source, max_length=max_length, rotary_scaling_factor=rotary_scaling_factor,
                                  device=device), pool)  # fmt: skip


def evaluate_loco(source: str, tasks: Sequence[RetrievalData], lengths: Sequence[int],
                  rotary_scaling_factor: float | None = 2.0, device: str | None = None,
                  mteb_tasks: Sequence[Any] = (), dims: Sequence[str] = (),
                  pool: RayPool | None = None) -> dict[str, float]:  # fmt: skip
    """``loco/<task>/<metric>/<length>`` for every task and length (one model load, re-truncated per length),
    and ``mrl/<dim|binary>/loco/...`` for the ``dims`` sweep of the local tasks.

    ``mteb_tasks``: mteb retrieval tasks run the same way (online, e.g. LongEmbed's ``LEMBQMSumRetrieval``).
    """
    from evaluation.api import parse_dims, variant_prefix
    from evaluation.mteb_suite import evaluate_mteb

    encoder = long_context_encoder(source, max(lengths), rotary_scaling_factor, device, pool)
    variants = [(None, False)] + parse_dims(list(dims), encoder.hidden_size)
    metrics: dict[str, float] = {}
    for length in sorted(lengths):
        encoder.set_max_length(length)
        for data in tasks:
            for variant, scores in evaluate_retrieval(encoder, data, variants).items():
                for metric, value in scores.items():
                    metrics[f"{variant_prefix(variant)}loco/{data.name}/{metric}/{length}"] = value
            log.info("LoCo %s @%d: nDCG@10 %.4f", data.name, length, metrics[f"loco/{data.name}/ndcg_at_10/{length}"])
        if mteb_tasks:
            for name, scores in evaluate_mteb(encoder, mteb_tasks, [(None, False)])[(None, False)].items():
                for metric in ("main_score", "ndcg_at_10", "recall_at_100", "mrr_at_10"):
                    if metric in scores:
                        metrics[f"loco/{name}/{metric}/{length}"] = scores[metric]
    return metrics


def evaluate_jina(source: str, lengths: Sequence[int] = JINA_LENGTHS, rotary_scaling_factor: float | None = 2.0,
                  device: str | None = None, pool: RayPool | None = None) -> dict[str, float]:  # fmt: skip
    """The four Jina long-context MTEB tasks (needs the Hub) -> ``jina/<task>/main_score/<length>``."""
    import mteb

    from evaluation.mteb_suite import evaluate_mteb

    encoder = long_context_encoder(source, max(lengths), rotary_scaling_factor, device, pool)
    metrics: dict[str, float] = {}
    tasks: list[Any] = [mteb.get_task(name) for name in JINA_TASKS]
    for length in sorted(lengths):
        encoder.set_max_length(length)
        per_task = evaluate_mteb(encoder, tasks, [(None, False)])[(None, False)]
        for name, scores in per_task.items():
            metrics[f"jina/{name}/main_score/{length}"] = scores["main_score"]
    return metrics
