"""How training data reaches the workers: seeded per-epoch order, one dataset per epoch, global batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class SeededOrder:
    """``map_batches`` adding ``order`` = a hash of (seed, epoch, row_id): sorting on it is a shuffle that every
    worker and every restart reproduces exactly (Ray's random_shuffle depends on block layout)."""

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        ids = np.asarray(batch["row_id"], dtype=np.uint64)
        key = (ids + np.uint64(self.seed * 1_000_003 + self.epoch)) * np.uint64(0x9E3779B97F4A7C15)
        key ^= key >> np.uint64(31)
        return {**batch, "order": key * np.uint64(0xBF58476D1CE4E5B9)}


def epoch_datasets(datasets: list[Any]) -> dict[str, Any]:
    """One Ray dataset per epoch (``epoch_0``, ``epoch_1``...): read one after the other by `global_batches`,
    each in its own deterministic order (a union would interleave them)."""
    return {f"epoch_{e}": ds for e, ds in enumerate(datasets)}


def global_batches(num_epochs: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """Inside a Ray Train worker: the full global batches of every epoch's dataset shard, in order."""
    import ray.train

    for epoch in range(num_epochs):
        shard = ray.train.get_dataset_shard(f"epoch_{epoch}")
        yield from shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True)


def ray_data_setup() -> None:
    """Attach to Ray (a job's cluster or a new local one) and quiet Ray Data."""
    import ray

    if not ray.is_initialized():
        ray.init()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
