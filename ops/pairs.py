"""Pairs: sources normalised to (query, document[, negatives]) with per-source prefixes, and single-source
global batches (spec §5, §7).

The ``pairs/`` folder keeps raw text and the prefix *names*; the trainer applies them with `with_prefixes`
(or `AddPrefixes` inside its Ray Data pipeline), so the teacher of the consistency filter sees unprefixed text,
as in the reference, and a prefix ablation needs no new data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from nomicbert.embed import TASK_PREFIXES, add_prefix

log = logging.getLogger(__name__)


def with_prefixes(texts: str | Sequence[str], prefix_name: str | None) -> str | list[str]:
    """``("how to brew", "search_query")`` -> ``"search_query: how to brew"``; lists map element-wise."""
    if isinstance(texts, str):
        return add_prefix([texts], prefix_name)[0]
    return add_prefix(list(texts), prefix_name)


class AddPrefixes:
    """``map_batches(AddPrefixes(), batch_format="numpy")`` on ``pairs/`` rows: prefixes query, document and
    negatives from their ``query_prefix``/``document_prefix`` columns (documents and negatives share one)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)
        qp, dp = batch["query_prefix"], batch["document_prefix"]
        for column, prefixes in (("query", qp), ("document", dp)):
            pairs = zip(batch[column], prefixes, strict=True)
            batch[column] = np.array([with_prefixes(str(t), str(p)) for t, p in pairs])
        if "negatives" in batch:
            negs = np.empty(len(dp), dtype=object)
            negs[:] = [with_prefixes(list(n), str(p)) for n, p in zip(batch["negatives"], dp, strict=True)]
            batch["negatives"] = negs
        return batch


class AttachPrefixNames:
    """Reader rows -> + ``query_prefix``/``document_prefix`` columns from the per-source config."""

    def __init__(self, prefixes: dict[str, tuple[str, str]]) -> None:
        for name, pair in prefixes.items():
            for p in pair:
                if p not in TASK_PREFIXES:
                    raise ValueError(f"source {name}: prefix {p!r} is not one of {sorted(TASK_PREFIXES)}")
        self.prefixes = prefixes

    def __call__(self, batch: pa.Table) -> pa.Table:
        sources = batch.column("source").to_pylist()
        batch = batch.append_column("query_prefix", pa.array([self.prefixes[s][0] for s in sources], pa.string()))
        return batch.append_column("document_prefix", pa.array([self.prefixes[s][1] for s in sources], pa.string()))


@dataclass
class BatchPlan:
    """Which source fills each global batch, and what is left over."""

    order: list[str]  # source of global batch 0, 1, ...
    batches_per_source: dict[str, int]
    dropped_remainder: dict[str, int]  # rows per source that do not fill a last global batch
    dropped_weight_zero: dict[str, int]  # rows of sources left out by a weight of 0


def plan_single_source_batches(counts: dict[str, int], global_batch: int, seed: int = 42,
                               weights: dict[str, float] | None = None) -> BatchPlan:  # fmt: skip
    """Seeded batch order: each step draws a source that still has full batches, with probability ∝ its
    remaining rows (default) or ∝ its mixture weight; a source stops when its full batches are used up."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    if weights is not None:
        unknown = sorted(set(weights) - set(counts))
        missing = sorted(set(counts) - set(weights))
        if unknown or missing:
            raise ValueError(f"weights must name exactly the sources {sorted(counts)}; unknown {unknown}, "
                             f"missing {missing} (use 0 to leave a source out)")  # fmt: skip
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0 with at least one > 0, got {weights}")
    names = sorted(counts)
    left_out = {s: counts[s] for s in names if weights is not None and weights[s] == 0}
    full = {s: (0 if s in left_out else counts[s] // global_batch) for s in names}
    remainder = {s: (0 if s in left_out else counts[s] % global_batch) for s in names}
    remaining = dict(full)
    rng = np.random.default_rng(seed)
    order: list[str] = []
    while any(remaining.values()):
        live = [s for s in names if remaining[s] > 0]
        mass = np.array([remaining[s] if weights is None else weights[s] for s in live], dtype=np.float64)
        pick = live[int(rng.choice(len(live), p=mass / mass.sum()))]
        order.append(pick)
        remaining[pick] -= 1
    return BatchPlan(order, full, remainder, left_out)


class _AssignBatches:
    """Looks up each row's (batch_index, batch_position) by row_id and drops rows that fill no full batch."""

    def __init__(self, row_ids: np.ndarray, batch_index: np.ndarray, batch_position: np.ndarray) -> None:
        order = np.argsort(row_ids)
        self.row_ids, self.batch_index, self.batch_position = row_ids[order], batch_index[order], batch_position[order]

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("row_id").to_numpy()
        at = np.searchsorted(self.row_ids, ids)
        index = self.batch_index[at]
        keep = index >= 0
        batch = batch.filter(pa.array(keep))
        batch = batch.append_column("batch_index", pa.array(index[keep], pa.int64()))
        return batch.append_column("batch_position", pa.array(self.batch_position[at][keep], pa.int64()))


def single_source_batches(ds, global_batch: int, seed: int = 42, weights: dict[str, float] | None = None):
    """Order ``pairs/`` rows into global batches that each hold one source only (the reference's rule).

    Returns ``ds`` sorted by the added int64 columns ``batch_index`` and ``batch_position``
    (0..global_batch-1). Rows of a source are shuffled (seeded), cut into floor(n / global_batch) full batches;
    the remainder rows are dropped and logged (`plan_single_source_batches` returns the counts). The batch order
    is drawn with probability ∝ remaining size, or ∝ ``weights`` (a weight of 0 leaves a source out).

    Data parallel training: trainer rank r of world size w takes, from each global batch, the rows with
    ``batch_position // (global_batch // w) == r`` (global_batch must be divisible by w), so all ranks see the
    same source at the same step and the gathered documents form the global batch.
    """
    import ray

    if "row_id" not in ds.columns() or "source" not in ds.columns():
        raise ValueError(f"single_source_batches needs columns row_id and source; the dataset has {ds.columns()}")
    frame = pa.concat_tables(ray.get(ds.select_columns(["row_id", "source"]).to_arrow_refs()))
    row_ids = frame.column("row_id").to_numpy().astype(np.int64)
    sources = np.array(frame.column("source").to_pylist(), dtype=object)
    names, counts = np.unique(sources, return_counts=True)
    plan = plan_single_source_batches(dict(zip(names.tolist(), counts.tolist(), strict=True)), global_batch, seed,
                                      weights)  # fmt: skip
    batch_index = np.full(len(row_ids), -1, dtype=np.int64)
    batch_position = np.full(len(row_ids), -1, dtype=np.int64)
    slots = {s: [i for i, o in enumerate(plan.order) if o == s] for s in plan.batches_per_source}
    rng = np.random.default_rng(seed)
    for name in names.tolist():
        members = np.flatnonzero(sources == name)
        members = members[np.argsort(row_ids[members])]  # canonical order, independent of block layout
        members = members[rng.permutation(len(members))][: plan.batches_per_source[name] * global_batch]
        local = np.arange(len(members))
        batch_index[members] = np.asarray(slots.get(name, []), dtype=np.int64)[local // global_batch]
        batch_position[members] = local % global_batch
    log.info("single_source_batches: %d global batches of %d; remainder rows dropped per source %s; "
             "left out by weight 0 %s", len(plan.order), global_batch, plan.dropped_remainder,
             plan.dropped_weight_zero)
    return ds.map_batches(_AssignBatches(row_ids, batch_index, batch_position), batch_format="pyarrow").sort(
        ["batch_index", "batch_position"])
