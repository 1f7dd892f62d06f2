"""Seeded orders and batch assignment row by row (no Ray), the row index, and two real Ray Train workers that read
every row once per epoch and resume without reading a consumed batch."""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict

import mlflow
import numpy as np
import pyarrow as pa
import pytest
from train_helpers import make_mlm_data, stage_config

from ops.order import RowIndex, SeededOrder, row_index
from ops.pairs import AssignBatches, plan_single_source_batches
from workflows import ingest, launch, mlm
from workflows.settings import ValidationSettings


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


def test_held_out_slice_is_each_sources_first_rows_in_proportion_and_leaves_the_index():
    """The validation slice: 23 of 230 rows as 18 of source a (180 rows) and 5 of b (50), each source's first rows
    in row-id order; the training index renumbers the rest from 0 and refuses the held-out ids."""
    index = RowIndex(starts=np.array([0, 100, 150]), ends=np.array([100, 150, 230]), source=np.array([0, 1, 0], np.int32),
                     first=np.array([0, 0, 100]), names=["a", "b"])  # fmt: skip
    held, rest = ingest.hold_out(index, 23)
    assert held == [(0, 18), (100, 105)] and rest.counts == {"a": 162, "b": 45}
    source, within = rest.lookup(np.array([18, 99, 105, 150, 229]))
    assert source.tolist() == [0, 0, 1, 0, 0] and within.tolist() == [0, 81, 0, 82, 161]
    with pytest.raises(ValueError, match="row_id 17 was not in the dataset"):
        rest.lookup(np.array([17]))
    none, same = ingest.hold_out(index, 0)
    assert none == [] and same.counts == index.counts
    with pytest.raises(ValueError, match="validation.rows is 230 but the data has only 230 rows"):
        ingest.hold_out(index, 230)
    with pytest.raises(ValueError, match="validation.rows \\(1\\) must be 0 or at least the 2 workers"):
        ValidationSettings(rows=1, every=5).check_workers(2)


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


class RowCounter:
    """Rows that passed the stage's row map, per epoch (a named Ray actor the map functions report to)."""

    def __init__(self):
        self.rows: Counter = Counter()

    def add(self, epoch: int, n: int) -> None:
        self.rows[epoch] += n

    def counts(self) -> dict[int, int]:
        return dict(self.rows)


class CountedRows:
    """The stage's row map, counting every row it sees."""

    def __init__(self, inner, counter: str, epoch: int):
        self.inner, self.counter, self.epoch = inner, counter, epoch

    def __call__(self, batch):
        import ray

        ray.get(ray.get_actor(self.counter).add.remote(self.epoch, len(batch["row_id"])))
        return self.inner(batch)


class CountingMaskedRows(mlm.MaskedRows):
    counter: str = ""

    def row_map(self, epoch: int):
        return CountedRows(super().row_map(epoch), self.counter, epoch)


def test_two_workers_read_each_row_once_per_epoch_and_resume_skips_consumed_batches(tmp_path, ray_session,
                                                                                    shared_data, mlflow_uri):  # fmt: skip
    """40 rows, global batch 8 (5 per epoch), max_steps 8 = 1.6 epochs. Run A is killed at step 4 (checkpoint at
    3) and not retried; run B (a new driver, same run) resumes: it reads epoch 0 from batch 3 on only."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the feeder unpickles the counting map
    data = make_mlm_data(shared_data, tmp_path / "mlm-data", rows=40, row_length=32)
    cfg = stage_config(mlm.MLMConfig, "mlm", tmp_path, data=str(data), output_dir=str(tmp_path / "model"),
                       model="tiny", model_overrides={}, global_batch=8, micro_batch=2, epochs=1, max_steps=8,
                       **{"run.name": "counted", "run.num_workers": 2, "run.cpus_per_worker": 0.5,
                          "run.checkpoint_every": 3, "run.fault_step": 4, "run.max_failures": 0,
                          "run.row_log": str(tmp_path / "rows")})  # fmt: skip
    counts = []
    for attempt in ("killed", "resumed"):
        counter = ray.remote(RowCounter).options(name=f"rows-{attempt}").remote()
        epochs, schedule = mlm.build_dataset(cfg)
        assert (schedule.batches_per_epoch, schedule.total_steps, schedule.epochs) == (5, 8, 2)
        counted = CountingMaskedRows(**{k: getattr(epochs, k) for k in epochs.__dataclass_fields__})
        counted.counter = f"rows-{attempt}"
        if attempt == "killed":
            with pytest.raises(Exception):  # noqa: B017 -- Ray Train's error for a worker that died
                launch.fit("mlm", cfg, mlm.train_loop_per_worker, counted, schedule, kind="mlm")
        else:
            result = launch.fit("mlm", cfg, mlm.train_loop_per_worker, counted, schedule, kind="mlm")
        counts.append(ray.get(counter.counts.remote()))
        ray.kill(counter)

    assert (tmp_path / f"fault-{cfg.run.name}-done").is_file()
    assert result["steps"] == 8  # max_steps, not one epoch's 5
    assert mlflow.get_run(result["mlflow_run_id"]).data.tags["mlm.epochs"] == "2"
    assert counts[0][0] == 40  # epoch 0 read once over both workers, not once per worker
    assert counts[1] == {0: 16, 1: 40}  # resumed at batch 3: batches 0-2 of epoch 0 never read again
    steps: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for rank in (0, 1):
        for line in (tmp_path / "rows" / f"rank-{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]][rank] = record["row_ids"]
    assert sorted(steps) == list(range(1, 9))
    for step, ranks in steps.items():
        assert len(ranks[0]) == len(ranks[1]) == 4 and not set(ranks[0]) & set(ranks[1]), step
    epoch_rows = [r for step in range(1, 6) for rank in (0, 1) for r in steps[step][rank]]
    assert sorted(epoch_rows) == list(range(40))  # each row exactly once in epoch 0, over the two workers
    second = [r for step in range(6, 9) for rank in (0, 1) for r in steps[step][rank]]
    assert len(set(second)) == 24 and second != epoch_rows[:24]  # epoch 1: its own order
