"""Hard-negative selection on corpora too small for n negatives, top-k candidates kept for per-epoch sampling,
negatives lists cleaned and counted, and the trainer's draw of k negatives per epoch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from time_limit import time_limit

from ops.readers import clean_negatives
from ops.teacher import merge_top, random_fill, select_negatives, shard_top
from workflows.contrastive import texts_of

CORPUS = [f"doc {i}" for i in range(9)]


def test_nine_documents_three_golds_and_seven_negatives_quarantines_instead_of_hanging():
    """Query q0 has 3 golds in a 9-document corpus: 6 eligible texts < 7. q1 has 1 gold: 8 eligible."""
    candidates = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    golds = [{"doc 0", "doc 1", "doc 2"}, {"doc 3"}]
    with time_limit(10):
        picked = select_negatives(candidates, CORPUS, ["q0", "q1"], golds, n=7, seed=0, row_keys=[0, 1])
    assert picked.negatives[0] is None and picked.too_few == 1 and picked.available == [6, 8]
    negatives = picked.negatives[1]
    assert len(negatives) == len(set(negatives)) == 7 and "doc 3" not in negatives
    # min_negatives below the count available: the short row gets all 6 eligible texts, and is counted
    with time_limit(10):
        filled = select_negatives(candidates, CORPUS, ["q0", "q1"], golds, n=7, seed=0, row_keys=[0, 1],
                                  min_negatives=5)  # fmt: skip
    assert sorted(filled.negatives[0]) == [f"doc {i}" for i in range(3, 9)] and filled.short == 1
    # a query equal to a corpus text is banned too, and a candidate list shorter than n is topped up
    with time_limit(10):
        topped = select_negatives(np.array([[4]]), CORPUS, ["doc 8"], [{"doc 0"}], n=7, seed=0, row_keys=[5])
    assert topped.topped_up == 1 and set(topped.negatives[0]) == {f"doc {i}" for i in range(1, 8)}


def test_keep_candidates_writes_the_filtered_top_k_best_first():
    corpus = [f"doc {i}" for i in range(40)]
    candidates = np.array([[5, 0, 9, 3, 7, 1, 2, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]])
    picked = select_negatives(candidates, corpus, ["q"], [{"doc 0", "doc 3"}], n=7, seed=0, row_keys=[0],
                              keep_candidates=True)  # fmt: skip
    assert picked.negatives[0] == [corpus[j] for j in candidates[0] if j not in (0, 3)]  # 18, teacher order
    short = select_negatives(candidates[:, :5], corpus, ["q"], [{"doc 0", "doc 3"}], n=7, seed=0, row_keys=[0],
                             keep_candidates=True)  # fmt: skip
    assert short.negatives[0][:3] == ["doc 5", "doc 9", "doc 7"] and len(short.negatives[0]) == 7  # topped up


def test_random_fill_ends_and_draws_uniformly():
    rng = np.random.default_rng(0)
    with time_limit(10):
        assert sorted(random_fill(rng, 10, set(range(7)), 3)) == [7, 8, 9]  # every free index
        counts = Counter(j for _ in range(3000) for j in random_fill(rng, 100, {0, 1, 2}, 2))
    assert set(counts) == set(range(3, 100))
    assert max(counts.values()) < 2.5 * min(counts.values())
    with pytest.raises(ValueError, match="cannot draw 4 of 3"):
        random_fill(rng, 5, {0, 1}, 4)


def test_negatives_lists_are_cleaned_and_counted():
    kept, removed = clean_negatives(["a", "", "b", "a", "  ", "doc", "query", "c"], "query", "doc")
    assert kept == ["a", "b", "c"]
    assert removed == {"empty": 2, "duplicate": 1, "equals_query_or_document": 2}


def test_trainer_draws_fresh_negatives_from_kept_candidates_each_epoch():
    """texts_of samples num_negatives of a row's kept candidates per global batch index, so each epoch (a new
    index for the same row) draws a new subset, and a restart at the same index draws the same one."""
    candidates = [f"neg {i}" for i in range(20)]
    batch = {"row_id": np.array([3]), "query": np.array(["q"]), "document": np.array(["d"]),
             "negatives": np.array([candidates], dtype=object)}  # fmt: skip
    draws = [texts_of(batch, 7, seed=1, index=epoch)[1] for epoch in range(6)]
    assert all(d[0] == "d" and len(set(d[1:])) == 7 and set(d[1:]) <= set(candidates) for d in draws)
    assert len({tuple(sorted(d[1:])) for d in draws}) == 6
    assert texts_of(batch, 7, seed=1, index=2)[1] == draws[2]
    assert len({n for d in draws for n in d[1:]}) > 15  # the whole top-k gets used over epochs


def test_search_over_corpus_shards_merges_to_the_whole_corpus_search_ties_included():
    """The mining search's order: score descending, then corpus position. Duplicated corpus vectors make ties at
    and across the k-th place; the tops of 4 uneven shards, merged, equal one ranking of the whole corpus."""
    rng = np.random.default_rng(3)
    corpus = rng.standard_normal((50, 8)).astype(np.float16)
    corpus[30:45] = corpus[5:20]  # 15 exact duplicates: equal scores at different positions
    queries = np.concatenate([rng.standard_normal((6, 8)), corpus[5:8].astype(np.float64)]).astype(np.float16)
    scores = queries.astype(np.float32) @ corpus.astype(np.float32).T
    expected = np.lexsort((np.broadcast_to(np.arange(50), scores.shape), -scores), axis=1)[:, :10]
    merged = None
    for lo, hi in ((0, 7), (7, 31), (31, 32), (32, 50)):
        part = shard_top(queries, corpus[lo:hi], np.arange(lo, hi), 10, device="cpu")
        merged = part if merged is None else merge_top(merged, part, 10)
    assert (merged[1] == expected).all()
    # torch's and numpy's matmul may round the last bit differently (BLAS kernels differ between CPUs)
    np.testing.assert_allclose(merged[0], np.take_along_axis(scores, expected, 1), rtol=1e-6)
    whole = shard_top(queries, corpus, np.arange(50), 10, device="cpu")
    assert (whole[1] == expected).all() and shard_top(queries, corpus[:3], np.arange(3), 10)[1].shape == (9, 3)
