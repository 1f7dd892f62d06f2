"""Seeded row orders that every worker and every restart reproduces, computed row by row (no sort, no driver).

`SeededOrder` is a keyed bijection of ``[0, n)``: a row's position in an epoch's order is a pure function of
(seed, epoch, stream, the row's index), so a ``map_batches`` can tell each row which global batch it falls in and
where, and rows can be routed to the workers that train on them without anyone holding the order. `RowIndex`
gives each row that index: its rank within its source in ``row_id`` order, from a handful of ``row_id`` runs
collected once per dataset (O(sources x files) numbers for the folders the ops jobs write, never O(rows)).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
FEISTEL_ROUNDS = 6


def mix64(x: np.ndarray | int) -> np.ndarray:
    """splitmix64's finaliser: a bijective full-avalanche mix of 64-bit words (every input bit flips about half
    of the output bits)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stream_id(name: str) -> int:
    """A stable 63-bit number for a stream name (a source), the same in every process."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


class SeededOrder:
    """The order of epoch ``epoch`` over ``n`` rows: ``positions(index)`` -> each row's place in ``[0, n)``.

    A 6-round balanced Feistel network over the smallest even power of two >= n, walking the cycle back into
    ``[0, n)``; its round keys come from a full 64-bit mix of (seed, epoch, stream), so two epochs (or two
    sources) get independent orders -- never one order shifted by a row, as adding the epoch to the row id would.
    """

    def __init__(self, seed: int, epoch: int, n: int, stream: str = ""):
        if n < 1:
            raise ValueError(f"an order needs at least one row, got n={n}")
        self.n = n
        key = mix64(mix64(mix64(np.uint64(seed % 2**64)) ^ np.uint64(epoch)) ^ np.uint64(stream_id(stream)))
        self.keys = [mix64(key ^ mix64(np.uint64(r))) for r in range(FEISTEL_ROUNDS)]
        bits = max(2, int(n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def positions(self, index: np.ndarray) -> np.ndarray:
        """Row indices in ``[0, n)`` -> their positions in this order (int64), a bijection of ``[0, n)``."""
        x = np.asarray(index, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise ValueError(f"row index {int(x.max())} is outside [0, {self.n})")
        x = self._round_trip(x)
        outside = x >= np.uint64(self.n)
        while outside.any():  # cycle walking: at most a few rounds, the domain is < 4n
            x[outside] = self._round_trip(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


@dataclass
class RowIndex:
    """Each row's index within its source (0..n-1 in ``row_id`` order), from the runs of consecutive row ids
    that belong to one source. Folders written by the ops jobs hold a few runs per file."""

    starts: np.ndarray  # int64 [runs], sorted: first row id of each run
    ends: np.ndarray  # int64 [runs]: one past the last row id
    source: np.ndarray  # int32 [runs]: index into ``names``
    first: np.ndarray  # int64 [runs]: index within its source of the run's first row
    names: list[str]  # sources, sorted

    @property
    def counts(self) -> dict[str, int]:
        lengths = np.bincount(self.source, weights=self.ends - self.starts, minlength=len(self.names))
        return {name: int(n) for name, n in zip(self.names, lengths, strict=True)}

    def lookup(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row ids -> (source index, index within the source); an id the index never saw is an error."""
        ids = np.asarray(row_ids, dtype=np.int64)
        run = np.searchsorted(self.starts, ids, side="right") - 1
        bad = (run < 0) | (ids >= self.ends[np.maximum(run, 0)])
        if bad.any():
            raise ValueError(f"row_id {int(ids[bad][0])} was not in the dataset when it was indexed; the input "
                             "changed during the run")  # fmt: skip
        return self.source[run], self.first[run] + (ids - self.starts[run])

    def split_head(self, quotas: dict[str, int]) -> tuple[list[tuple[int, int]], RowIndex]:
        """The first ``quotas[source]`` rows of each source (row-id order) as row-id ranges ``[start, end)``, and
        the index of the other rows (their indices within the source renumbered from 0). A held-out slice."""
        quota = np.array([quotas.get(name, 0) for name in self.names], dtype=np.int64)[self.source]
        head = np.clip(quota - self.first, 0, self.ends - self.starts)  # rows of each run inside its source's head
        held = [(int(s), int(s + h)) for s, h in zip(self.starts, head, strict=True) if h > 0]
        rest = head < self.ends - self.starts
        return held, RowIndex(self.starts[rest] + head[rest], self.ends[rest], self.source[rest],
                              self.first[rest] + head[rest] - quota[rest], self.names)  # fmt: skip


def block_runs(id_column: str, source_column: str | None):
    """``map_batches`` function: a block's (``row_id``, ``source``) -> its runs (``start``, ``end``, ``source``)."""

    def runs(batch: pa.Table) -> pa.Table:
        ids = batch.column(id_column).to_numpy().astype(np.int64)
        sources = (np.asarray(batch.column(source_column).to_pylist(), dtype=object) if source_column
                   else np.full(len(ids), "", dtype=object))  # fmt: skip
        order = np.argsort(ids, kind="stable")
        ids, sources = ids[order], sources[order]
        breaks = np.flatnonzero((np.diff(ids) != 1) | (sources[1:] != sources[:-1])) + 1
        starts = np.concatenate([[0], breaks]).astype(np.int64) if len(ids) else np.zeros(0, np.int64)
        ends = np.concatenate([breaks, [len(ids)]]).astype(np.int64) if len(ids) else np.zeros(0, np.int64)
        return pa.table({"start": ids[starts] if len(ids) else starts, "end": ids[ends - 1] + 1 if len(ids) else ends,
                         "source": pa.array(sources[starts].tolist(), pa.string())})  # fmt: skip

    return runs


def row_index(ds, id_column: str = "row_id", source_column: str | None = "source", **remote_args) -> RowIndex:
    """One distributed pass over two columns of ``ds`` -> its `RowIndex` (``source_column=None``: one source).

    Raises ValueError when a row id appears twice (the index would be ambiguous)."""
    columns = [id_column] + ([source_column] if source_column else [])
    missing = [c for c in columns if c not in ds.columns()]
    if missing:
        raise ValueError(f"the dataset has no column(s) {missing}; it has {ds.columns()}")
    runs = ds.select_columns(columns).map_batches(block_runs(id_column, source_column), batch_format="pyarrow",
                                                  batch_size=None, **remote_args)  # fmt: skip
    parts = [b for b in runs.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    if not parts:
        raise ValueError("the dataset has no rows")
    table = pa.concat_tables(parts)
    starts, ends = table.column("start").to_numpy(), table.column("end").to_numpy()
    names, source = np.unique(np.asarray(table.column("source").to_pylist(), dtype=object), return_inverse=True)
    order = np.argsort(starts, kind="stable")
    starts, ends, source = starts[order], ends[order], source[order].astype(np.int32)
    overlap = np.flatnonzero(starts[1:] < ends[:-1])
    if overlap.size:
        raise ValueError(f"{id_column} {int(starts[overlap[0] + 1])} appears more than once; row ids must be unique")
    # merge runs that continue each other (a run split over two blocks)
    keep = np.concatenate([[True], (starts[1:] != ends[:-1]) | (source[1:] != source[:-1])])
    starts, source = starts[keep], source[keep]
    ends = np.maximum.reduceat(ends, np.flatnonzero(keep))
    lengths = ends - starts
    first = np.zeros(len(starts), dtype=np.int64)
    for s in range(len(names)):
        mine = np.flatnonzero(source == s)
        first[mine] = np.concatenate([[0], np.cumsum(lengths[mine])[:-1]])
    return RowIndex(starts, ends, source, first, [str(n) for n in names])
