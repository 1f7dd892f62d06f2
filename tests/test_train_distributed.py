"""Two real gloo workers: same losses as one worker over the same global batches (documents gathered), and a
worker killed mid-run resumes at the same step and data position with every row used exactly once."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
from train_helpers import make_pairs, metric_history, pair_rows, stage_config

from nomicbert.checkpoint import save_pretrained
from nomicbert.config import tiny
from nomicbert.model import NomicBertModel
from nomicbert.tokenizer import load_tokenizer
from workflows import contrastive


def test_two_workers_match_one_and_resume_after_a_kill(tmp_path, ray_session, shared_data, mlflow_uri):
    init = save_pretrained(NomicBertModel(tiny()), tmp_path / "init", load_tokenizer())
    data = make_pairs(pair_rows(shared_data, wiki=32, snli=32), tmp_path / "pairs", negatives=False)
    shared = {"data": str(data), "init_checkpoint": str(init), "global_batch": 16, "grad_cache_chunk": 4, "epochs": 1,
              "optim.lr": 1e-3, "optim.warmup_steps": 1, "run.checkpoint_every": 2}  # fmt: skip
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
    assert sorted(consumed) == list(range(64))  # every row exactly once, none skipped
