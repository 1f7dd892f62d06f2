"""Long-context retrieval at 8192 tokens on CPU: the tail of a QMSum transcript really changes the embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation import EvalConfig, run
from evaluation.data import load_qmsum
from evaluation.loco import long_context_encoder


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    import torch

    from nomicbert.checkpoint import save_pretrained
    from nomicbert.config import tiny
    from nomicbert.model import NomicBertModel
    from nomicbert.tokenizer import load_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-long")
    save_pretrained(NomicBertModel(tiny(max_position_embeddings=8192)), folder, load_tokenizer())
    return folder


@pytest.fixture(scope="module")
def two_queries(shared_data, tmp_path_factory):
    """The first QMSum meeting with only two of its queries: two ~10k-token documents."""
    meeting = json.loads((shared_data / "qmsum" / "test.jsonl").open().readline())
    meeting["general_query_list"] = meeting["general_query_list"][:1]
    meeting["specific_query_list"] = meeting["specific_query_list"][:1]
    folder = tmp_path_factory.mktemp("qmsum2")
    (folder / "test.jsonl").write_text(json.dumps(meeting) + "\n")
    return folder


def test_8192_uses_the_tail(tiny_long, two_queries):
    document = next(iter(load_qmsum(two_queries).corpus.values()))["text"]
    encoder = long_context_encoder(str(tiny_long), 8192, rotary_scaling_factor=2.0)
    assert len(encoder.embedder.tokenize([document])[0]) == 8192  # the transcript is longer than 8192 tokens
    long = encoder.raw([document], "search_document")
    encoder.set_max_length(2048)
    assert len(encoder.embedder.tokenize([document])[0]) == 2048
    short = encoder.raw([document], "search_document")
    # replace only tokens past 4096 (with a copy of the head): the 8192-token embedding moves, the tail is used
    encoder.set_max_length(8192)
    ids = encoder.embedder.tokenize(["search_document: " + document])[0]
    replaced = ids[:4096] + ids[1 : len(ids) - 4096] + ids[-1:]
    assert len(replaced) == len(ids) and replaced[4096:-1] != ids[4096:-1]
    pooled = encoder.embedder.pool([ids, replaced]).numpy()
    np.testing.assert_allclose(pooled[0], long[0], atol=1e-4)
    assert np.abs(pooled[0] - pooled[1]).max() > 1e-3
    assert np.abs(long - short).max() > 1e-2  # 8192 tokens is not the 2048-token truncation


def test_loco_suite_logs_each_length(tiny_long, two_queries, mlflow_uri):
    import mlflow

    metrics = run(EvalConfig(model=str(tiny_long), loco=[str(two_queries)], loco_lengths=[2048, 8192],
                             dims=["binary"], experiment="loco-test"))  # fmt: skip
    assert f"mrl/binary/loco/{two_queries.name}/ndcg_at_10/8192" in metrics
    name = two_queries.name
    for length in (2048, 8192):
        for metric in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
            assert 0.0 < metrics[f"loco/{name}/{metric}/{length}"] <= 1.0
    run_id = mlflow.search_runs(experiment_names=["loco-test"]).iloc[0].run_id
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert "score_vs_context_length.png" in artifacts
