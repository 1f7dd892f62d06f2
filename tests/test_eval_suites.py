"""End to end on real data slices: a tiny checkpoint of ours and the MiniLM baseline land side by side in MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation import EvalConfig, run
from evaluation.compare import collect
from evaluation.data import load_beir
from evaluation.encoders import (ModelSpec, NomicEncoder, RayDataEncoder, RayPool, SentenceTransformerEncoder,
                                 load_encoder)
from evaluation.retrieval import retrieval_metrics


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from nomicbert.checkpoint import save_pretrained
    from nomicbert.config import tiny
    from nomicbert.model import NomicBertModel
    from nomicbert.tokenizer import load_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-encoder")
    save_pretrained(NomicBertModel(tiny(hidden_size=128, embedding_recipe="v1.5")), folder, load_tokenizer())
    return folder


def test_retrieval_metrics_by_hand():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 2}}
    run_ = {"q1": {"x": 0.9, "a": 0.8}, "q2": {"c": 0.7, "b": 0.6, "x": 0.5}}
    scores = retrieval_metrics(qrels, run_)
    assert scores["mrr_at_10"] == pytest.approx((1 / 2 + 1) / 2)
    assert scores["recall_at_100"] == pytest.approx(1.0)
    ideal_q1 = 1 / np.log2(3)  # relevant at rank 2
    assert scores["ndcg_at_10"] == pytest.approx((ideal_q1 + 1.0) / 2)


def test_tiny_checkpoint_and_minilm_side_by_side(tiny_checkpoint, minilm_path, shared_data, mlflow_uri, tmp_path):
    scifact, stsb = shared_data / "scifact", shared_data / "stsb" / "test.tsv"
    ours = run(EvalConfig(model=str(tiny_checkpoint), beir=[str(scifact)], sts=[str(stsb)],
                          mteb=[f"scifact_mteb={scifact}", f"STSBenchmark={stsb}"], dims=["64", "binary", "512"],
                          limit=8, experiment="eval-test", run_name="tiny", output=str(tmp_path / "tiny.json")))
    for name in ("beir/scifact/ndcg_at_10", "beir/scifact/recall_at_100", "beir/scifact/mrr_at_10",
                 "sts/stsb/spearman", "mteb/scifact_mteb/ndcg_at_10", "mteb/STSBenchmark/cosine_spearman",
                 "mteb/avg_main_score", "mrl/64/beir/scifact/ndcg_at_10", "mrl/64/sts/stsb/spearman",
                 "mrl/binary/mteb/avg_main_score", "mrl/64/mteb/scifact_mteb/main_score", "beir/avg_ndcg_at_10",
                 "sts/avg_spearman", "mrl/binary/beir/avg_ndcg_at_10", "mrl/64/sts/avg_spearman"):
        assert name in ours, name
    assert not any(name == "avg" or name.endswith("/avg") for name in ours)  # every average says what it averages
    assert ours["sts/avg_spearman"] == ours["sts/stsb/spearman"]  # one STS set: its average is its score
    assert not any(k.startswith("mrl/512/") for k in ours)  # larger than the tiny model's 128 dims: skipped
    # our BEIR scorer and mteb's evaluator agree on the same local folder
    assert ours["beir/scifact/ndcg_at_10"] == pytest.approx(ours["mteb/scifact_mteb/ndcg_at_10"], abs=1e-4)
    assert json.loads((tmp_path / "tiny.json").read_text())["metrics"] == ours

    baseline = run(EvalConfig(model=str(minilm_path), beir=[str(scifact)], sts=[str(stsb)], limit=8,
                              experiment="eval-test", run_name="minilm"))  # fmt: skip
    # a trained model beats a random tiny one on the same slice
    assert baseline["beir/scifact/ndcg_at_10"] > ours["beir/scifact/ndcg_at_10"] + 0.2
    assert baseline["sts/stsb/spearman"] > 0.5

    import mlflow

    experiment = mlflow.get_experiment_by_name("eval-test")
    assert experiment.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    columns = collect(experiment="eval-test", prefix="beir/")
    assert [label.split(" ")[0] for label in columns] == ["tiny", "minilm"]
    assert list(columns.values())[1]["beir/scifact/ndcg_at_10"] == pytest.approx(baseline["beir/scifact/ndcg_at_10"])
    runs = mlflow.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    tiny_run = mlflow.get_run(runs.iloc[0].run_id)
    assert tiny_run.data.params["model_kind"] == "nomic"
    assert tiny_run.data.params["data/beir/scifact"].startswith(str(scifact))
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(tiny_run.info.run_id)}
    assert {"summary.md", "summary.json", "score_vs_dim.png"} <= artifacts


def test_cli_prints_table_and_compare(tiny_checkpoint, shared_data, mlflow_uri, tmp_path, capsys):
    from evaluation.__main__ import main
    from evaluation.compare import main as compare_main

    assert main(["--model", str(tiny_checkpoint), "--sts", str(shared_data / "stsb" / "test.tsv"), "--limit", "20",
                 "--experiment", "cli", "--output", str(tmp_path / "out.json")]) == 0  # fmt: skip
    assert "sts/stsb/spearman" in capsys.readouterr().out
    assert compare_main(["--experiment", "cli"]) == 0
    assert "sts/stsb/pearson" in capsys.readouterr().out
    broken = tmp_path / "broken"
    broken.mkdir()
    assert main(["--model", str(tiny_checkpoint), "--beir", str(broken), "--no-mlflow"]) == 2
    assert "corpus.jsonl: missing" in capsys.readouterr().err


def test_encoders_dispatch_and_ray_data_matches_in_process(tiny_checkpoint, minilm_path, shared_data, ray_session):
    assert isinstance(load_encoder(str(minilm_path)), SentenceTransformerEncoder)
    encoder = load_encoder(str(tiny_checkpoint))
    assert isinstance(encoder, NomicEncoder) and encoder.max_length == 512
    data = load_beir(shared_data / "scifact", limit_queries=3, limit_corpus=40)
    texts = data.document_texts(list(data.corpus))
    local = encoder.raw(texts, "search_document")
    queries = list(data.queries.values())
    remote = load_encoder(ModelSpec(str(tiny_checkpoint)), RayPool(workers=2, batch_size=16))
    assert isinstance(remote, RayDataEncoder) and (remote.hidden_size, remote.is_nomic) == (encoder.hidden_size, True)
    remote.prefetch([("search_document", texts), ("search_query", queries)])  # one Ray Data job for both tasks
    np.testing.assert_allclose(remote.raw(texts, "search_document"), local, atol=1e-5)
    np.testing.assert_allclose(remote.encode(queries, "search_query", binary=True),
                               encoder.encode(queries, "search_query", binary=True), atol=1e-5)  # fmt: skip
    # the prefix matters: documents and queries are encoded differently
    assert not np.allclose(encoder.raw(texts[:2], "search_query"), local[:2])


def test_logs_into_the_active_run_of_a_pipeline(tiny_checkpoint, shared_data, mlflow_uri):
    import mlflow

    from evaluation.report import experiment_id

    with mlflow.start_run(experiment_id=experiment_id("pipeline"), run_name="evaluate") as stage:
        run(EvalConfig(model=str(tiny_checkpoint), sts=[str(shared_data / "stsb" / "test.tsv")], limit=10))
        run(EvalConfig(model=str(tiny_checkpoint), beir=[str(shared_data / "scifact")], limit=3))  # same params again
    logged = mlflow.get_run(stage.info.run_id).data
    assert {"sts/stsb/spearman", "beir/scifact/ndcg_at_10"} <= set(logged.metrics)
    assert logged.params["model"] == str(tiny_checkpoint)
    assert mlflow.get_experiment_by_name("evaluation") is None  # nothing went to a run of its own
