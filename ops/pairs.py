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
from ops.order import RowIndex, SeededOrder, row_index

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
    """Which source fills each global batch of an epoch, and what is left over."""

    order: list[str]  # source of global batch 0, 1, ...
    batches_per_source: dict[str, int]
    dropped_remainder: dict[str, int]  # rows per source that do not fill a last global batch
    dropped_weight_zero: dict[str, int]  # rows of sources left out by a weight of 0

    def slots(self) -> dict[str, np.ndarray]:
        """Per source, the global batch indices its batches fill, in the order its rows are cut into batches."""
        order = np.asarray(self.order, dtype=object)
        return {s: np.flatnonzero(order == s).astype(np.int64) for s in self.batches_per_source}


def plan_single_source_batches(counts: dict[str, int], global_batch: int, seed: int = 42,
                               weights: dict[str, float] | None = None, epoch: int = 0) -> BatchPlan:  # fmt: skip
    """Seeded batch order of one epoch: each step draws a source that still has full batches, with probability ∝
    its remaining rows (default) or ∝ its mixture weight; a source stops when its full batches are used up.
    The driver holds O(sources + batches) numbers, whatever the number of rows."""
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
    remaining = np.array([full[s] for s in names], dtype=np.float64)
    mass_of = np.array([1.0 if weights is None else weights[s] for s in names], dtype=np.float64)
    rng = np.random.default_rng([seed, epoch])
    picks = np.empty(int(remaining.sum()), dtype=np.int64)
    for step in range(len(picks)):
        mass = remaining * mass_of if weights is None else np.where(remaining > 0, mass_of, 0.0)
        pick = int(rng.choice(len(names), p=mass / mass.sum()))
        picks[step] = pick
        remaining[pick] -= 1
    return BatchPlan([names[i] for i in picks], full, remainder, left_out)


class AssignBatches:
    """``map_batches(..., batch_format="pyarrow")``: each row's global batch of the epoch, in the row itself.

    Adds int64 ``batch_index`` and ``batch_position`` (0..global_batch-1). A source's rows take the positions of
    a `SeededOrder` (seed, epoch, source) of their index within the source (`RowIndex`); position p falls in the
    source's (p // global_batch)-th batch of the plan. Rows that fill no full batch (a source's remainder, a
    source left out by weight 0) and rows of batches before ``first_batch`` (consumed before a restart) are
    dropped here, before anything else reads them. ``shuffle=False`` keeps row-id order.
    """

    def __init__(self, index: RowIndex, plan: BatchPlan, global_batch: int, seed: int, epoch: int,
                 shuffle: bool = True, first_batch: int = 0) -> None:  # fmt: skip
        self.index, self.global_batch, self.first_batch = index, global_batch, first_batch
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        slots = plan.slots()
        per_source = [slots.get(name, np.zeros(0, np.int64)) for name in index.names]
        self.batches = np.array([len(s) for s in per_source], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.batches)[:-1]]).astype(np.int64)
        self.slots = np.concatenate(per_source) if per_source else np.zeros(0, np.int64)
        self.counts = index.counts

    def positions(self, source: np.ndarray, within: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return within
        out = np.empty_like(within)
        for s in np.unique(source):
            rows = source == s
            name = self.index.names[s]
            out[rows] = SeededOrder(self.seed, self.epoch, self.counts[name], name).positions(within[rows])
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        source, within = self.index.lookup(batch.column("row_id").to_numpy())
        position = self.positions(source, within)
        nth = position // self.global_batch
        full = nth < self.batches[source]
        batch_index = np.full(len(position), -1, dtype=np.int64)
        batch_index[full] = self.slots[self.offsets[source[full]] + nth[full]]
        keep = full & (batch_index >= self.first_batch)
        batch = batch.filter(pa.array(keep))
        batch = batch.append_column("batch_index", pa.array(batch_index[keep], pa.int64()))
        return batch.append_column("batch_position", pa.array(position[keep] % self.global_batch, pa.int64()))


def single_source_batches(ds, global_batch: int, seed: int = 42, weights: dict[str, float] | None = None,
                          epoch: int = 0, index: RowIndex | None = None, **remote_args):  # fmt: skip
    """Order ``pairs/`` rows into global batches that each hold one source only (the reference's rule).

    Returns ``ds`` sorted by the added int64 columns ``batch_index`` and ``batch_position``
    (0..global_batch-1). Rows of a source are shuffled (seeded per epoch), cut into floor(n / global_batch) full
    batches; the remainder rows are dropped and logged. The batch order is drawn with probability ∝ remaining
    size, or ∝ ``weights`` (a weight of 0 leaves a source out). Everything per row runs in Ray Data
    (`AssignBatches`); the driver holds the `RowIndex` runs and the plan, O(sources + batches).

    Data parallel training: trainer rank r of world size w takes, from each global batch, the rows with
    ``batch_position // (global_batch // w) == r`` (global_batch must be divisible by w), so all ranks see the
    same source at the same step and the gathered documents form the global batch.
    """
    if "row_id" not in ds.columns() or "source" not in ds.columns():
        raise ValueError(f"single_source_batches needs columns row_id and source; the dataset has {ds.columns()}")
    index = index or row_index(ds, **remote_args)
    plan = plan_single_source_batches(index.counts, global_batch, seed, weights, epoch)
    log.info("single_source_batches: %d global batches of %d; remainder rows dropped per source %s; "
             "left out by weight 0 %s", len(plan.order), global_batch, plan.dropped_remainder,
             plan.dropped_weight_zero)
    assign = AssignBatches(index, plan, global_batch, seed, epoch)
    return ds.map_batches(assign, batch_format="pyarrow", **remote_args).sort(["batch_index", "batch_position"])
