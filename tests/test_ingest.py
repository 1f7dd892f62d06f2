"""Seeded orders and batch assignment row by row (no Ray), and the row index."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pytest

from ops.order import RowIndex, SeededOrder, row_index
from ops.pairs import AssignBatches, plan_single_source_batches


def test_seeded_order_is_a_bijection_for_every_size():
    for n in (1, 2, 3, 7, 64, 1000, 4099):
        positions = SeededOrder(3, 1, n, "s").positions(np.arange(n))
        assert sorted(positions.tolist()) == list(range(n)), n
    assert not np.array_equal(SeededOrder(3, 0, 1000).positions(np.arange(1000)),
                              SeededOrder(3, 0, 1000, "other").positions(np.arange(1000)))  # fmt: skip
    with pytest.raises(ValueError, match="outside"):
        SeededOrder(0, 0, 10).positions(np.array([10]))


def one_source_index(n: int) -> RowIndex:
    return RowIndex(np.array([0]), np.array([n]), np.array([0], np.int32), np.array([0]), [""])


def batch_of(n: int, global_batch: int, epoch: int) -> np.ndarray:
    """Global batch of each row id in ``epoch``, through the map function the trainers use."""
    index = one_source_index(n)
    plan = plan_single_source_batches(index.counts, global_batch, seed=7, epoch=epoch)
    out = AssignBatches(index, plan, global_batch, seed=7, epoch=epoch)(pa.table({"row_id": np.arange(n)}))
    batches = np.full(n, -1)
    batches[out.column("row_id").to_numpy()] = out.column("batch_index").to_numpy()
    return batches


def test_two_epochs_orders_are_independent():
    n, global_batch = 10_000, 64
    first, second = batch_of(n, global_batch, 0), batch_of(n, global_batch, 1)
    together_again = together = 0
    for b in range(n // global_batch):
        rows = np.flatnonzero(first == b)
        counts = np.unique(second[rows][second[rows] >= 0], return_counts=True)[1]
        together_again += int((counts * (counts - 1)).sum())
        together += len(rows) * (len(rows) - 1)
    chance = global_batch / n
    assert chance / 2 < together_again / together < 2 * chance, (together_again / together, chance)
    # no shift of row ids maps epoch 0's order onto epoch 1's (the old hash added the epoch to the row id)
    order = [np.argsort(batch_of(n, global_batch, e) * n + np.arange(n))[: n - n % global_batch] for e in (0, 1)]
    for shift in range(-10, 11):
        assert np.mean(order[1] == order[0] + shift) < 0.01, shift


def test_assignment_fills_single_source_batches_and_skips_consumed_ones():
    index = RowIndex(starts=np.array([0, 100, 150]), ends=np.array([100, 150, 230]), source=np.array([0, 1, 0], np.int32),
                     first=np.array([0, 0, 100]), names=["a", "b"])  # fmt: skip
    assert index.counts == {"a": 180, "b": 50}
    plan = plan_single_source_batches(index.counts, 16, seed=1, epoch=2)
    rows = pa.table({"row_id": np.arange(230)})
    out = AssignBatches(index, plan, 16, seed=1, epoch=2)(rows).to_pydict()
    assert len(out["row_id"]) == (180 // 16 + 50 // 16) * 16  # remainders dropped
    by_batch = defaultdict(list)
    for row_id, b, p in zip(out["row_id"], out["batch_index"], out["batch_position"], strict=True):
        by_batch[b].append((p, "b" if 100 <= row_id < 150 else "a"))
    for b, members in by_batch.items():
        assert sorted(p for p, _ in members) == list(range(16)) and {s for _, s in members} == {plan.order[b]}
    later = AssignBatches(index, plan, 16, seed=1, epoch=2, first_batch=5)(rows).to_pydict()
    assert sorted(set(later["batch_index"])) == list(range(5, len(plan.order)))
    with pytest.raises(ValueError, match="row_id 230 was not in the dataset"):
        index.lookup(np.array([230]))


def test_row_index_from_interleaved_blocks(ray_session):
    import ray

    sources = np.array(["x", "y"])[(np.arange(300) // 7) % 2]
    order = np.random.default_rng(0).permutation(300)
    ds = ray.data.from_arrow([pa.table({"row_id": order[i::3], "source": sources[order[i::3]]}) for i in range(3)])
    index = row_index(ds)
    assert index.counts == dict(Counter(sources.tolist()))
    source, within = index.lookup(np.arange(300))
    for s, name in enumerate(index.names):
        assert np.array_equal(within[source == s], np.arange((sources == name).sum()))  # row-id order
    doubled = ray.data.from_arrow([pa.table({"row_id": [1, 2, 3], "source": ["x"] * 3})] * 2)
    with pytest.raises(ValueError, match="appears more than once"):
        row_index(doubled)
