"""GLUE fine-tuning of a tiny masked-LM checkpoint on CPU: the recipe runs, metric names are GLUE's."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import EvalConfig, GlueConfig, run
from evaluation.glue import evaluate_glue, task_metrics, task_spec


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    import torch

    from nomicbert.checkpoint import save_pretrained
    from nomicbert.config import tiny
    from nomicbert.model import NomicBertForPreTraining
    from nomicbert.tokenizer import load_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-mlm")
    save_pretrained(NomicBertForPreTraining(tiny()), folder, load_tokenizer())
    return folder


def small_recipe(**changes) -> GlueConfig:
    base = dict(epochs=1, batch_sizes=[16], learning_rates=[1e-4], seeds=[0, 1], max_train_examples=48,
                max_eval_examples=48)  # fmt: skip
    return GlueConfig(**{**base, **changes})


def test_metrics_are_the_benchmark_definitions():
    labels = np.array([1, 0, 1, 1])
    logits = np.array([[0, 1], [1, 0], [1, 0], [0, 1]], dtype=float)
    assert task_metrics(task_spec("mrpc"), labels, logits) == pytest.approx({"f1": 0.8, "accuracy": 0.75})
    matthews = 2 / 12**0.5  # TP 2, TN 1, FN 1, FP 0
    assert task_metrics(task_spec("cola"), labels, logits) == pytest.approx({"matthews": matthews})
    regression = task_metrics(task_spec("sts-b"), np.array([1.0, 2, 3]), np.array([1.0, 3, 2]))
    assert set(regression) == {"spearman", "pearson"} and regression["spearman"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'"):
        task_spec("wnli")


def test_mrpc_and_rte_fine_tune_and_log(tiny_mlm, shared_data, mlflow_uri):
    import mlflow

    glue = small_recipe(tasks=["mrpc", "rte"], data_dir=str(shared_data / "glue"))
    metrics = run(EvalConfig(model=str(tiny_mlm), glue=glue, experiment="glue-test", run_name="tiny-mlm"))
    assert set(metrics) == {"glue/mrpc/f1", "glue/mrpc/accuracy", "glue/rte/accuracy", "glue/avg_main_metric"}
    assert 0.0 <= metrics["glue/rte/accuracy"] <= 1.0
    assert metrics["glue/avg_main_metric"] == pytest.approx((metrics["glue/mrpc/f1"] + metrics["glue/rte/accuracy"]) / 2)
    run_ = mlflow.search_runs(experiment_names=["glue-test"]).iloc[0]
    assert run_["params.glue/mrpc/batch_size"] == "16" and run_["params.glue_recipe/epochs"] == "1"
    assert run_["metrics.glue/mrpc/f1"] == pytest.approx(metrics["glue/mrpc/f1"])


def test_sweep_as_ray_tune_trials(tiny_mlm, shared_data, ray_session):
    glue = small_recipe(tasks=["stsb"], data_dir=str(shared_data / "glue"), learning_rates=[1e-4, 3e-4], seeds=[0],
                        use_tune=True, trial_cpus=1.0)  # fmt: skip
    metrics, chosen = evaluate_glue(str(tiny_mlm), glue)
    assert set(metrics) == {"glue/stsb/spearman", "glue/stsb/pearson", "glue/avg_main_metric"}
    assert chosen["glue/stsb/lr"] in (1e-4, 3e-4)
    # the same trial in-process gives the same number (Tune only schedules it)
    same = small_recipe(tasks=["stsb"], data_dir=str(shared_data / "glue"), learning_rates=[chosen["glue/stsb/lr"]],
                        seeds=[0])  # fmt: skip
    plain, _ = evaluate_glue(str(tiny_mlm), same)
    assert plain["glue/stsb/spearman"] == pytest.approx(metrics["glue/stsb/spearman"], abs=1e-4)
