"""A 2-trial Tune grid over the hard-negatives count on CPU: each trial a real fine-tuning run of a tiny encoder
on real SNLI triplets, then STS evaluation; one MLflow child run per trial under the ablation's parent run."""

from __future__ import annotations

import json

import mlflow
import pytest
from train_helpers import PROJECT, make_pairs, pair_rows

from nomicbert.checkpoint import save_pretrained
from nomicbert.config import tiny
from nomicbert.model import NomicBertModel
from nomicbert.tokenizer import load_tokenizer
from ops.config import ConfigError, load_config
from workflows import ablate


def ablate_config(tmp, shared_data, data, init, **overrides):
    base = {
        "finetune_overrides": [f"data={data}", f"init_checkpoint={init}", "global_batch=16", "max_steps=2",
                               "run.num_workers=0", "run.log_every=1", "optim.warmup_steps=1", "validation.rows=0"],
        "num_negatives": [0, 1], "mixtures": {"all": None},
        "evaluate.sts": [f"stsb-dev={shared_data / 'stsb' / 'dev.tsv'}"], "evaluate.beir": [], "evaluate.limit": 30,
        "metric": "sts/stsb-dev/spearman", "report.sts": [f"stsb={shared_data / 'stsb' / 'test.tsv'}"],
        "report.beir": [], "report_metric": "sts/stsb/spearman", "storage_path": str(tmp / "ablate"),
        "experiment": "ablate-test",
        "name": "ablate-test", "trial_cpus": 1.0,  # as shipped: the trial task holds 1 of the 2 CPUs, Ray Data the other
    }  # fmt: skip
    items = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in {**base, **overrides}.items()]
    return load_config(ablate.AblateConfig, PROJECT / "workflows" / "configs" / "ablate.yaml", items)


@pytest.fixture()
def tiny_setup(tmp_path, shared_data):
    init = tmp_path / "tiny-init"
    save_pretrained(NomicBertModel(tiny()), init, load_tokenizer())
    data = make_pairs(pair_rows(shared_data, wiki=0, snli=32), tmp_path / "triplets", negatives=True)
    return data, init


def test_negatives_grid_logs_one_child_run_per_trial(tmp_path, shared_data, ray_session, mlflow_uri, tiny_setup):
    data, init = tiny_setup
    result = ablate.run(ablate_config(tmp_path, shared_data, data, init))

    assert [t["error"] for t in result["trials"]] == [None, None]
    assert sorted(t["num_negatives"] for t in result["trials"]) == [0, 1]
    best = result["best"]
    assert best["score"] == max(t["score"] for t in result["trials"]) and best["mixture"] == "all"

    parent = mlflow.get_run(result["parent_run_id"])
    assert parent.data.tags["best_trial"] == f"negatives={best['num_negatives']},mixture=all"
    assert parent.data.metrics["ablate/best_score"] == pytest.approx(best["score"])
    # chosen on the dev split; the test split's score of the same trial logged beside it
    assert parent.data.tags["selected_on"] == "validation" and parent.data.tags["report_metric"] == "sts/stsb/spearman"
    assert parent.data.metrics["ablate/best_test_score"] == pytest.approx(best["test_score"])
    children = mlflow.search_runs([result["experiment_id"]], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    assert sorted(c.info.run_name for c in children) == ["negatives=0,mixture=all", "negatives=1,mixture=all"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["num_negatives"] in ("0", "1") and child.data.params["mixture"] == "all"
        assert -1 <= child.data.metrics["sts/stsb-dev/spearman"] <= 1
        assert child.data.metrics["ablate/score"] == child.data.metrics["sts/stsb-dev/spearman"]
        assert child.data.metrics["ablate/test_score"] == child.data.metrics["sts/stsb/spearman"]
        assert "finetune/loss" in child.data.metrics
    # the job left mlflow's process-wide tracking URI alone: a later store in this process is not redirected
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
        assert mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"


def test_rejects_more_negatives_than_the_data_holds(tmp_path, shared_data, tiny_setup):
    data, init = tiny_setup  # SNLI triplets hold one negative per row
    with pytest.raises(ValueError, match="num_negatives 3 exceeds the 1 hard negatives"):
        ablate.run(ablate_config(tmp_path, shared_data, data, init, num_negatives=[1, 3]))
    with pytest.raises(ValueError, match="not in"):
        ablate.run(ablate_config(tmp_path, shared_data, data, init, mixtures={"nowiki": {"wikipedia": 1.0}}))


def test_the_best_trial_is_never_chosen_on_a_test_split(tmp_path, shared_data):
    with pytest.raises(ConfigError, match="not a validation split"):
        ablate_config(tmp_path, shared_data, "data", "init", **{"evaluate.sts": [f"stsb={shared_data}/stsb/test.tsv"]})
    with pytest.raises(ConfigError, match="not a validation split"):
        ablate_config(tmp_path, shared_data, "data", "init", **{"evaluate.beir": [f"{shared_data}/scifact"]})
    ablate_config(tmp_path, shared_data, "data", "init", **{"evaluate.beir": [f"{tmp_path}/split/validation"]})
    with pytest.raises(ConfigError, match="also validation names"):
        ablate_config(tmp_path, shared_data, "data", "init",
                      **{"report.sts": [f"stsb-dev={shared_data}/stsb/test.tsv"]})  # fmt: skip


def test_search_grid_sets_each_trial_and_rejects_what_it_cannot_vary(tmp_path, shared_data):
    config = ablate_config(tmp_path, shared_data, "data", "init",
                           search={"optim.lr": [1e-5, 5e-5], "document_max_length": [128, 256]})  # fmt: skip
    grid = ablate.settings(config)
    assert len(grid) == 4 and [g["document_max_length"] for g in grid] == [128, 256, 128, 256]
    raw = ablate.finetune_raw(config)
    cfg = ablate.trial_config(raw, config, 1, "all", "t0", grid[-1])
    assert (cfg.optim.lr, cfg.document_max_length, cfg.num_negatives) == (5e-5, 256, 1)
    assert ablate.trial_name(1, "all", grid[-1]) == "negatives=1,mixture=all,optim.lr=5e-05,document_max_length=256"
    assert ablate.trial_config(raw, config, 1, "all", "t1").optim.lr == raw["optim"]["lr"]  # the setting did not leak
    with pytest.raises(ConfigError, match="lrr"):
        ablate.trial_config(raw, config, 1, "all", "t2", {"optim.lrr": 1e-5})
    for key in ("num_negatives", "data", "run.num_workers"):
        with pytest.raises(ConfigError, match="not searchable"):
            ablate_config(tmp_path, shared_data, "data", "init", search={key: [1]})
    with pytest.raises(ConfigError, match="non-empty list"):
        ablate_config(tmp_path, shared_data, "data", "init", search={"epochs": []})
