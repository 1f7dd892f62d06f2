"""How training data reaches the workers: every row read once per epoch, each worker given only its own rows.

An epoch is a lazy Ray Data pipeline (`Epochs.rows`): read -> `ops.pairs.AssignBatches` (each row's global batch
and position, computed row by row from a seeded order; rows of consumed batches dropped here on resume) -> the
stage's row maps (masking, prefixes) -> `RankSlots` (which worker trains on the row) -> one sort -> materialised
once. An `EpochFeeder` actor runs that per epoch (the next one prepared while this one trains) and hands worker r
the contiguous range of rows that are its slice of every global batch, in order: nothing is read twice and no
worker sees another's rows. The driver holds the row index and the counts, never rows.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from ops.order import RowIndex, row_index
from ops.pairs import AssignBatches, plan_single_source_batches

log = logging.getLogger("workflows.train")
NAMESPACE = "nomic-embed-ray"
SLOT = "_slot"


class Epochs(Protocol):
    """A stage's training data, epoch by epoch (built in the driver, used by the `EpochFeeder`)."""

    batches_per_epoch: int
    global_batch: int
    held_out: list[tuple[int, int]]  # row-id ranges of the validation slice

    def rows(self, epoch: int, first_batch: int) -> Any:
        """Lazy Ray dataset: the rows of global batches ``first_batch..`` of ``epoch``, with ``batch_index`` and
        ``batch_position``."""

    def held_out_rows(self) -> dict[str, np.ndarray] | None:
        """The validation slice (rows no epoch holds) as numpy columns, or None."""


@dataclass
class Schedule:
    """How many steps a run takes and how many epochs that is: ``max_steps`` drives, epochs cycle as needed."""

    batches_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, batches_per_epoch: int, epochs: int, max_steps: int, too_small: str) -> Schedule:
        """``max_steps`` > 0: exactly that many steps; else ``epochs`` epochs. ``too_small``: the error when an
        epoch holds no full global batch."""
        if batches_per_epoch == 0:
            raise ValueError(too_small)
        return cls(batches_per_epoch, max_steps or batches_per_epoch * epochs)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.batches_per_epoch)

    def describe(self) -> str:
        last = self.total_steps - (self.epochs - 1) * self.batches_per_epoch
        tail = "" if last == self.batches_per_epoch else f" (the last one {last} steps)"
        return f"{self.total_steps} steps = {self.epochs} epoch(s) of {self.batches_per_epoch} steps{tail}"


@dataclass
class ParquetEpochs:
    """`Epochs` over ``part-*.parquet`` files: rows of global batches that each hold one source (a dataset without
    a ``source`` column is one source), in a seeded order per epoch and source (or row-id order without
    ``shuffle``), then `row_map`. Subclasses add the stage's row map."""

    files: list[str]
    columns: list[str]
    index: RowIndex
    global_batch: int
    seed: int
    shuffle: bool
    weights: dict[str, float] | None  # mixture weights per source; None = by size
    remote_args: dict[str, Any]  # for every read and map task (custom resources that pick the node type)
    held_out: list[tuple[int, int]]  # row-id ranges [start, end) of the validation slice: never in an epoch

    def __post_init__(self) -> None:
        plan = plan_single_source_batches(self.index.counts, self.global_batch, self.seed, self.weights)
        self.batches_per_epoch = len(plan.order)
        if any(plan.dropped_remainder.values()) or plan.dropped_weight_zero:
            log.info("per epoch: %d global batches of %d; rows that fill no full batch, per source: %s; left out "
                     "by weight 0: %s", self.batches_per_epoch, self.global_batch, plan.dropped_remainder,
                     plan.dropped_weight_zero)  # fmt: skip

    def row_map(self, epoch: int) -> Any:
        """A ``map_batches`` callable (numpy batches) applied to every row of the epoch, or None."""
        return None

    def rows(self, epoch: int, first_batch: int) -> Any:
        import ray

        plan = plan_single_source_batches(self.index.counts, self.global_batch, self.seed, self.weights, epoch)
        assign = AssignBatches(self.index, plan, self.global_batch, self.seed, epoch, self.shuffle, first_batch)
        ds = ray.data.read_parquet(self.files, columns=self.columns, ray_remote_args=self.remote_args)
        if self.held_out:  # a filter on row_id: pushed into the read
            ds = ds.filter(expr=outside(self.held_out), **self.remote_args)
        ds = ds.map_batches(assign, batch_format="pyarrow", **self.remote_args)
        row_map = self.row_map(epoch)
        return ds if row_map is None else ds.map_batches(row_map, batch_format="numpy", **self.remote_args)

    def held_out_rows(self) -> dict[str, np.ndarray] | None:
        """The validation slice as numpy columns in row-id order, through epoch 0's row map (for masked-LM a fixed,
        seeded masking), or None without one. Read in the driver: a few hundred rows, found by a filter on
        ``row_id`` pushed into the read (row groups outside the ranges are skipped)."""
        import ray

        if not self.held_out:
            return None
        ds = ray.data.read_parquet(self.files, columns=self.columns, ray_remote_args=self.remote_args)
        ds = ds.filter(expr=inside(self.held_out), **self.remote_args)
        row_map = self.row_map(0)
        if row_map is not None:
            ds = ds.map_batches(row_map, batch_format="numpy", **self.remote_args)
        parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(rows["row_id"], kind="stable")
        return {k: v[order] for k, v in rows.items()}


def hold_out(index: RowIndex, rows: int) -> tuple[list[tuple[int, int]], RowIndex]:
    """The validation slice: ``rows`` rows spread over the sources in proportion to their size (the largest
    remainders get the leftover rows), each source's first rows in row-id order -- the same rows on every run and
    restart. Returns their row-id ranges and the index of the training rows."""
    counts = index.counts
    total = sum(counts.values())
    if rows >= total:
        raise ValueError(f"validation.rows is {rows} but the data has only {total} rows; hold out fewer")
    share = {name: rows * n / total for name, n in counts.items()}
    quotas = {name: int(s) for name, s in share.items()}
    leftover = sorted(counts, key=lambda name: (quotas[name] - share[name], name))[: rows - sum(quotas.values())]
    for name in leftover:
        quotas[name] += 1
    return index.split_head(quotas)


def inside(ranges: list[tuple[int, int]]) -> Any:
    """A Ray Data expression: ``row_id`` in one of the ranges ``[start, end)``."""
    from ray.data.expressions import col

    return functools.reduce(operator.or_, ((col("row_id") >= a) & (col("row_id") < b) for a, b in ranges))


def outside(ranges: list[tuple[int, int]]) -> Any:
    """A Ray Data expression: ``row_id`` in none of the ranges ``[start, end)``."""
    from ray.data.expressions import col

    return functools.reduce(operator.and_, ((col("row_id") < a) | (col("row_id") >= b) for a, b in ranges))


def data_remote_args(resources: dict[str, float]) -> dict[str, Any]:
    """Ray remote args of the input pipeline's tasks: the custom resources of the data node type, if any."""
    return {"resources": dict(resources)} if resources else {}


def index_parquet(files: list[str], source_column: str | None, remote_args: dict[str, Any]) -> RowIndex:
    """The `RowIndex` of ``part-*.parquet`` files: one pass over ``row_id`` (and ``source``)."""
    import ray

    columns = ["row_id"] + ([source_column] if source_column else [])
    ds = ray.data.read_parquet(files, columns=columns, ray_remote_args=remote_args)
    return row_index(ds, source_column=source_column, **remote_args)


class RankSlots:
    """``map_batches``: the sort key that lays the epoch out worker after worker: rank r's slice of global batch
    b (positions [r n, (r + 1) n), n = global_batch / world) comes before rank r's slice of batch b + 1 and after
    all of rank r - 1's rows."""

    def __init__(self, global_batch: int, world: int, first_batch: int, num_batches: int):
        self.per_rank, self.first, self.num = global_batch // world, first_batch, num_batches

    def __call__(self, batch: pa.Table) -> pa.Table:
        index = batch.column("batch_index").to_numpy() - self.first
        position = batch.column("batch_position").to_numpy()
        rank, offset = np.divmod(position, self.per_rank)
        return batch.append_column(SLOT, pa.array((rank * self.num + index) * self.per_rank + offset, pa.int64()))


class EpochFeeder:
    """Prepares each epoch once and gives every worker its own rows (a Ray actor; see the module docstring).

    ``shard(epoch, first_batch, rank)`` -> rank's rows of global batches ``first_batch..`` of ``epoch`` as a
    materialised dataset, in training order. The epoch after it is prepared in the background; older epochs are
    released (a worker still reading one keeps its blocks alive).
    """

    def __init__(self, epochs: Epochs, world: int, num_epochs: int):
        self.epochs, self.world, self.num_epochs = epochs, world, num_epochs
        self.pool = ThreadPoolExecutor(max_workers=2)
        ray_data_setup()
        import ray

        ray.data.DataContext.get_current().execution_options.preserve_order = True  # the sort's order, kept
        self.lock = threading.Lock()
        self.prepared: dict[int, tuple[int, Future]] = {}  # epoch -> (first batch, future of per-rank datasets)

    def _prepare(self, epoch: int, first_batch: int) -> list[Any]:
        remaining = self.epochs.batches_per_epoch - first_batch
        layout = RankSlots(self.epochs.global_batch, self.world, first_batch, remaining)
        ds = self.epochs.rows(epoch, first_batch).map_batches(layout, batch_format="pyarrow").sort(SLOT)
        ds = ds.drop_columns([SLOT]).materialize()
        per_rank = remaining * (self.epochs.global_batch // self.world)
        if ds.count() != per_rank * self.world:
            raise RuntimeError(f"epoch {epoch} from batch {first_batch} has {ds.count()} rows, expected "
                               f"{per_rank * self.world}: the input changed during the run")  # fmt: skip
        log.info("epoch %d ready from global batch %d: %d rows", epoch, first_batch, per_rank * self.world)
        return ds.split_at_indices([r * per_rank for r in range(1, self.world)]) if self.world > 1 else [ds]

    def _future(self, epoch: int, first_batch: int) -> Future:
        known = self.prepared.get(epoch)
        if known is None or known[0] > first_batch:
            known = (first_batch, self.pool.submit(self._prepare, epoch, first_batch))
            self.prepared[epoch] = known
        return known[1]

    def shard(self, epoch: int, first_batch: int, rank: int) -> Any:
        with self.lock:
            for old in [e for e in self.prepared if e < epoch]:
                del self.prepared[old]
            future = self._future(epoch, first_batch)
            if epoch + 1 < self.num_epochs:
                self._future(epoch + 1, 0)
            prepared_from = self.prepared[epoch][0]
        shard = future.result()[rank]
        skip = (first_batch - prepared_from) * (self.epochs.global_batch // self.world)
        return shard.split_at_indices([skip])[1] if skip else shard

    def stats(self) -> dict[str, Any]:
        """What the feeder costs: its peak memory (MB; it holds block references, never rows) and the epochs it
        holds."""
        import resource

        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "epochs_held": sorted(self.prepared)}  # fmt: skip


def start_feeder(epochs: Epochs, world: int, num_epochs: int, name: str, resources: dict[str, float]):
    """The run's `EpochFeeder` as a named actor (0 CPUs; on the data node type when ``resources`` name it)."""
    import ray

    return ray.remote(EpochFeeder).options(
        name=name, namespace=NAMESPACE, num_cpus=0, max_concurrency=max(4, world + 2), max_restarts=-1,
        max_task_retries=-1, resources={k: min(v, 0.001) for k, v in resources.items()},
    ).remote(epochs, world, num_epochs)  # fmt: skip


def worker_batches(feeder: str, schedule: Schedule, global_batch: int, rank: int, world: int,
                   first_batch: int) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
    """Inside a Ray Train worker: its slice of every global batch from ``first_batch`` (counted over epochs) to
    the end of the run, as numpy columns; the consumed batches are never read."""
    import ray

    actor = ray.get_actor(feeder, namespace=NAMESPACE)
    per_rank = global_batch // world
    index = first_batch
    while index < schedule.total_steps:
        epoch, within = divmod(index, schedule.batches_per_epoch)
        shard = ray.get(actor.shard.remote(epoch, within, rank))
        for batch in shard.iter_batches(batch_size=per_rank, batch_format="numpy", prefetch_batches=2):
            check_slice(batch, within, rank, per_rank)
            yield batch
            index, within = index + 1, within + 1
            if index == schedule.total_steps or within == schedule.batches_per_epoch:
                break


def batches_for_worker(loop_config: dict[str, Any], global_batch: int, rank: int, world: int) -> Iterator[Any]:
    """A Ray Train worker's batches for the loop: ``None`` for each global batch consumed before a restart (the
    loop skips them by index; nothing is read for them), then its own slices from the `EpochFeeder`."""
    import itertools

    schedule = Schedule(loop_config["batches_per_epoch"], loop_config["total_steps"])
    first = batches_consumed()
    own = worker_batches(loop_config["feeder"], schedule, global_batch, rank, world, first)
    return itertools.chain(itertools.repeat(None, first), own)


def validation_rows(loop_config: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """Inside a Ray Train worker: the held-out rows the driver read once (`ParquetEpochs.held_out_rows`), or None."""
    import ray

    ref = loop_config.get("validation")
    return None if ref is None else ray.get(ref)


def validation_share(rows: dict[str, np.ndarray], rank: int, world_size: int) -> dict[str, np.ndarray]:
    """Worker ``rank``'s equal share of the held-out rows: every worker runs as many forwards (collectives under
    DDP and FSDP); a remainder that does not split evenly is left out."""
    per_rank = len(rows["row_id"]) // world_size
    return {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in rows.items()}


def batches_consumed() -> int:
    """Global batches trained on before this (re)start: the latest checkpoint's ``batches_consumed``, read
    from storage without downloading the checkpoint (0 on a fresh start)."""
    import json

    import ray.train

    from workflows.checkpoints import PROGRESS_FILE, STATE_DIR

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_DIR}/{PROGRESS_FILE}") as f:
        return int(json.loads(f.read())["batches_consumed"])


def check_slice(batch: dict[str, np.ndarray], index: int, rank: int, per_rank: int) -> None:
    """A worker's rows of global batch ``index``: all of them, in position order, nobody else's."""
    expected = np.arange(rank * per_rank, (rank + 1) * per_rank)
    if not (np.all(batch["batch_index"] == index) and np.array_equal(batch["batch_position"], expected)):
        raise RuntimeError(f"rank {rank} expected positions {expected[0]}..{expected[-1]} of global batch {index}, "
                           f"got batches {sorted(set(batch['batch_index'].tolist()))}")  # fmt: skip


def ray_data_setup() -> None:
    """Attach to Ray (a job's cluster or a new local one) and quiet Ray Data (in an actor, its console too)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    from ops.console import quiet_worker

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    quiet_worker()  # in an actor (the epoch feeder): Ray Data's routine lines to its log file
