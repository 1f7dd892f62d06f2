"""Local task files: real slices load; malformed folders fail with the file and the problem named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from evaluation.data import DataError, load_beir, load_pairs, load_qmsum
from evaluation.mteb_suite import resolve_tasks


def make_beir(root: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple[str, str, int]] | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in queries))
    if qrels is not None:
        (root / "qrels").mkdir(exist_ok=True)
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
        (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


DOCS = [{"_id": "d1", "title": "Rotary", "text": "rotary position embeddings"},
        {"_id": "d2", "title": "", "text": "ntk"}]
QUERIES = [{"_id": "q1", "text": "what is rope"}, {"_id": "q2", "text": "unjudged"}]


def test_real_scifact_slice_keeps_judged_documents(shared_data):
    data = load_beir(shared_data / "scifact", limit_queries=5, limit_corpus=50)
    assert data.name == "scifact" and len(data.queries) == 5
    judged = {d for docs in data.qrels.values() for d in docs}
    assert judged <= set(data.corpus) and len(data.corpus) <= 50 + len(judged)
    first = next(iter(data.corpus))
    assert data.document_texts([first])[0] == (data.corpus[first]["title"] + " " + data.corpus[first]["text"]).strip()


def test_only_judged_queries_are_kept(tmp_path):
    data = load_beir(make_beir(tmp_path / "ok", DOCS, QUERIES, [("q1", "d1", 1)]))
    assert list(data.queries) == ["q1"] and data.document_texts(["d2"]) == ["ntk"]


def test_missing_qrels_names_the_file(tmp_path):
    folder = make_beir(tmp_path / "noqrels", DOCS, QUERIES, None)
    with pytest.raises(DataError, match=r"qrels/test\.tsv: missing"):
        load_beir(folder)


def test_unknown_corpus_id_in_qrels(tmp_path):
    folder = make_beir(tmp_path / "baddoc", DOCS, QUERIES, [("q1", "d1", 1), ("q1", "d404", 1)])
    with pytest.raises(DataError, match=r"test\.tsv: 1 corpus id\(s\) not in corpus\.jsonl, e\.g\. \['d404'\]"):
        load_beir(folder)


def test_unknown_query_id_in_qrels(tmp_path):
    folder = make_beir(tmp_path / "badquery", DOCS, QUERIES, [("q9", "d1", 1)])
    with pytest.raises(DataError, match=r"test\.tsv: 1 query id\(s\) not in queries\.jsonl"):
        load_beir(folder)


def test_empty_corpus(tmp_path):
    folder = make_beir(tmp_path / "empty", [], QUERIES, [("q1", "d1", 1)])
    with pytest.raises(DataError, match=r"corpus\.jsonl: empty corpus"):
        load_beir(folder)


def test_bad_json_line_and_missing_field(tmp_path):
    folder = make_beir(tmp_path / "badjson", DOCS, QUERIES, [("q1", "d1", 1)])
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n{not json\n')
    with pytest.raises(DataError, match=r"queries\.jsonl: line 2 is not valid JSON"):
        load_beir(folder)
    (folder / "corpus.jsonl").write_text('{"_id": "d1"}\n')
    with pytest.raises(DataError, match=r"corpus\.jsonl: line 1 lacks field\(s\) \['text'\]"):
        load_beir(folder)


def test_malformed_local_mteb_task_fails_before_any_model(tmp_path):
    folder = make_beir(tmp_path / "broken", DOCS, QUERIES, [("q1", "d404", 1)])
    with pytest.raises(DataError, match="d404"):
        resolve_tasks([str(folder)])
    with pytest.raises(DataError, match="no such task folder or file"):
        resolve_tasks([str(tmp_path / "nowhere")])


def test_sts_files(shared_data, tmp_path):
    pairs = load_pairs(shared_data / "stsb" / "test.tsv", limit=10)
    assert pairs.name == "stsb" and len(pairs.scores) == 10 and 0 <= min(pairs.scores) <= max(pairs.scores) <= 5
    bad = tmp_path / "pairs.tsv"
    bad.write_text("sentence1\tscore\na\t1\n")
    with pytest.raises(DataError, match=r"pairs\.tsv: header .* lacks column\(s\) \['sentence2'\]"):
        load_pairs(bad)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": "high"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl: a score is not a number"):
        load_pairs(jsonl)


def test_qmsum_is_loco_style(shared_data, tmp_path):
    data = load_qmsum(shared_data / "qmsum", limit_meetings=2)
    assert len(data.corpus) == len(data.queries) == len(data.qrels) > 2
    key = next(iter(data.corpus))
    assert data.qrels[key] == {key: 1} and len(data.corpus[key]["text"].split()) > 2000
    shutil.copy(shared_data / "qmsum" / "test.jsonl", tmp_path / "test.jsonl")
    (tmp_path / "test.jsonl").write_text('{"topic_list": []}\n')
    with pytest.raises(DataError, match=r"test\.jsonl: line 1 lacks field\(s\) \['meeting_transcripts'\]"):
        load_qmsum(tmp_path)
