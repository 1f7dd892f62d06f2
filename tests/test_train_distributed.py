"""Two real gloo workers: same losses as one worker over the same global batches (documents gathered), and a
worker killed mid-run resumes at the same step and data position with every row used exactly once -- with DDP
(contrastive) and with FSDP sharding (masked-LM: tied weights, gradient accumulation). Validation is on: the
held-out scores (each worker its share) equal one worker's, and no held-out row is trained on."""

from __future__ import annotations

import json
from collections import defaultdict

import mlflow
import numpy as np
import torch
from train_helpers import make_mlm_data, make_pairs, metric_history, pair_rows, stage_config

from nomicbert.checkpoint import load_model, save_pretrained
from nomicbert.config import tiny
from nomicbert.model import NomicBertModel
from nomicbert.tokenizer import load_tokenizer
from workflows import contrastive, mlm


def test_two_workers_match_one_and_resume_after_a_kill(tmp_path, ray_session, shared_data, mlflow_uri):
    init = save_pretrained(NomicBertModel(tiny()), tmp_path / "init", load_tokenizer())
    data = make_pairs(pair_rows(shared_data, wiki=34, snli=34), tmp_path / "pairs", negatives=False)  # 2 + 2 held out
    shared = {"data": str(data), "init_checkpoint": str(init), "global_batch": 16, "grad_cache_chunk": 4, "epochs": 1,
              "optim.lr": 1e-3, "optim.warmup_steps": 1, "run.checkpoint_every": 2, "validation.rows": 4,
              "validation.every": 2}  # fmt: skip
    one = contrastive.run(stage_config(contrastive.ContrastiveConfig, "contrastive", tmp_path, **shared,
                                       output_dir=str(tmp_path / "one" / "model"), **{"run.name": "one"}))  # fmt: skip
    two_cfg = stage_config(contrastive.ContrastiveConfig, "contrastive", tmp_path, **shared,
                           output_dir=str(tmp_path / "two" / "model"),
                           **{"run.name": "two", "run.num_workers": 2, "run.cpus_per_worker": 0.5, "run.fault_step": 3,
                              "run.max_failures": 1, "run.row_log": str(tmp_path / "rows")})  # fmt: skip
    two = contrastive.run(two_cfg)

    assert one["steps"] == two["steps"] == 4
    assert (tmp_path / "two" / "fault-two-done").is_file()  # the worker really was killed at step 3
    losses_one = metric_history(one["mlflow_run_id"], "contrastive/loss")
    losses_two = metric_history(two["mlflow_run_id"], "contrastive/loss")
    assert sorted(losses_two) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses_two[s] for s in range(1, 5)], [losses_one[s] for s in range(1, 5)], rtol=2e-4)

    steps_by_pid: dict[int, list[int]] = defaultdict(list)
    rows_by_step: dict[tuple[int, int], list[int]] = {}
    for rank in (0, 1):
        for line in (tmp_path / "rows" / f"rank-{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            steps_by_pid[record["pid"]].append(record["step"])
            rows_by_step[(rank, record["step"])] = record["row_ids"]
    # rank 0: steps 1-2 before the kill, 3-4 in the restarted process (resumed from the step-2 checkpoint)
    assert sorted(sorted(steps) for steps in steps_by_pid.values()) == [[1, 2], [1, 2], [3, 4], [3, 4]]
    consumed = [r for rows in rows_by_step.values() for r in rows]
    assert sorted(consumed) == [*range(2, 34), *range(36, 68)]  # every row exactly once but the held-out 0-1, 34-35
    assert_same_validation(one, two, ("retrieval_accuracy", "mrr", "info_nce_loss"))


def assert_same_validation(one: dict, two: dict, names: tuple[str, ...]) -> None:
    """The held-out scores at steps 2 and 4 (step 4 after the restart): two workers, each its share, equal one."""
    for name in names:
        val_one, val_two = (metric_history(r["mlflow_run_id"], f"val/{name}") for r in (one, two))
        assert sorted(val_one) == sorted(val_two) == [2, 4], (val_one, val_two)
        np.testing.assert_allclose([val_two[s] for s in (2, 4)], [val_one[s] for s in (2, 4)], rtol=2e-4, err_msg=name)


def test_fsdp_shards_matches_one_worker_and_resumes(tmp_path, ray_session, shared_data, mlflow_uri):
    data = make_mlm_data(shared_data, tmp_path / "mlm-data", rows=36, row_length=64)  # rows 0-3 held out
    # 2 workers x 2 micro-batches of 2 rows: the first micro-batch's backward runs without gradient sync
    shared = {"data": str(data), "model": "tiny", "model_overrides": {}, "global_batch": 8, "micro_batch": 2,
              "epochs": 1, "max_steps": 0, "optim.lr": 5e-3, "run.checkpoint_every": 2, "validation.rows": 4,
              "validation.every": 2}  # fmt: skip
    one = mlm.run(stage_config(mlm.MLMConfig, "mlm", tmp_path, **shared, output_dir=str(tmp_path / "one" / "model"),
                               **{"run.name": "one"}))  # fmt: skip
    two = mlm.run(stage_config(mlm.MLMConfig, "mlm", tmp_path, **shared, output_dir=str(tmp_path / "two" / "model"),
                               **{"run.name": "two", "run.num_workers": 2, "run.strategy": "fsdp",
                                  "run.cpus_per_worker": 0.5, "run.fault_step": 3, "run.max_failures": 1,
                                  "run.row_log": str(tmp_path / "fsdp-rows")}))  # fmt: skip

    assert one["steps"] == two["steps"] == 4
    assert (tmp_path / "two" / "fault-two-done").is_file()  # killed at step 3, resumed from the sharded run's step 2
    steps_by_pid: dict[int, list[int]] = defaultdict(list)
    trained: list[int] = []
    for rank in (0, 1):
        for line in (tmp_path / "fsdp-rows" / f"rank-{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            steps_by_pid[record["pid"]].append(record["step"])
            trained += record["row_ids"]
    assert sorted(sorted(steps) for steps in steps_by_pid.values()) == [[1, 2], [1, 2], [3, 4], [3, 4]]
    assert sorted(trained) == list(range(4, 36))  # the held-out rows 0-3 never trained on
    assert_same_validation(one, two, ("mlm_loss", "mlm_accuracy"))
    tags = mlflow.get_run(two["mlflow_run_id"]).data.tags
    assert int(tags["mlm.parameters_per_worker"]) < 0.55 * int(tags["mlm.parameters"])  # really sharded
    losses_one, losses_two = (metric_history(r["mlflow_run_id"], "mlm/loss") for r in (one, two))
    np.testing.assert_allclose([losses_two[s] for s in range(1, 5)], [losses_one[s] for s in range(1, 5)], rtol=2e-4)
    # the checkpoint is a whole, unsharded model that loads anywhere, equal to the one-worker result
    weights_one, weights_two = (load_model(r["model"], kind="mlm").state_dict() for r in (one, two))
    assert weights_one.keys() == weights_two.keys()
    for key in weights_one:
        torch.testing.assert_close(weights_two[key], weights_one[key], atol=2e-4, rtol=1e-3, msg=key)
