"""Exact dense retrieval and its scores: cosine top-k, nDCG@10 / recall@100 / MRR@10 via pytrec_eval.

The corpus is encoded in-process (sorted by length, batched by the encoder) or, above a size threshold,
with Ray Data across actor workers that each load the model once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from evaluation.data import PairData, RetrievalData
from evaluation.encoders import ModelSpec, TextEncoder, encode_with_ray

log = logging.getLogger(__name__)

TOP_K = 1000  # what MTEB retrieves per query; nDCG@10 only needs 10 but recall@100 and MRR need depth


def search(queries: np.ndarray, corpus: np.ndarray, top_k: int = TOP_K,
           chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Exact inner-product top-k (cosine on L2-normalised rows) -> (scores [q, k], indices [q, k])."""
    k = min(top_k, corpus.shape[0])
    docs = torch.from_numpy(np.ascontiguousarray(corpus, dtype=np.float32))
    scores, indices = [], []
    for start in range(0, queries.shape[0], chunk):
        sims = torch.from_numpy(np.ascontiguousarray(queries[start : start + chunk], dtype=np.float32)) @ docs.T
        top = sims.topk(k, dim=1)
        scores.append(top.values.numpy())
        indices.append(top.indices.numpy())
    return np.concatenate(scores), np.concatenate(indices)


def retrieval_metrics(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """nDCG@10, recall@100 (pytrec_eval, as MTEB computes them) and MRR@10 averaged over judged queries."""
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    per_query = evaluator.evaluate(run)
    n = len(qrels)
    ndcg = sum(per_query.get(q, {}).get("ndcg_cut_10", 0.0) for q in qrels) / n
    recall = sum(per_query.get(q, {}).get("recall_100", 0.0) for q in qrels) / n
    mrr = 0.0
    for q, judged in qrels.items():
        ranked = sorted(run.get(q, {}).items(), key=lambda item: -item[1])[:10]
        rank = next((r for r, (doc, _) in enumerate(ranked, 1) if judged.get(doc, 0) > 0), None)
        mrr += 1.0 / rank if rank else 0.0
    return {"ndcg_at_10": ndcg, "recall_at_100": recall, "mrr_at_10": mrr / n}


def encoding_work(encoder: TextEncoder, beir: Sequence[RetrievalData],
                  sts: Sequence[PairData]) -> list[tuple[str | None, list[str]]]:  # fmt: skip
    """Every (task, texts) that `evaluate_retrieval` and `evaluate_sts` (default tasks) will ask of ``encoder``, so
    an encoder in a Ray Data actor pool encodes them in one job (`TextEncoder.prefetch`)."""
    prompts = encoder.uses_task_prompts
    work: list[tuple[str | None, list[str]]] = []
    for data in beir:
        work.append(("search_document" if prompts else None, data.document_texts(list(data.corpus))))
        work.append(("search_query" if prompts else None, list(data.queries.values())))
    for pairs in sts:
        work.append(("classification" if prompts else None, [*pairs.sentence1, *pairs.sentence2]))
    return work


def evaluate_retrieval(encoder: TextEncoder, data: RetrievalData, variants: Sequence[tuple[int | None, bool]],
                       query_task: str = "search_query", document_task: str = "search_document",
                       spec: ModelSpec | None = None, ray_min_docs: int | None = None, ray_workers: int = 2,
                       ray_gpus: float = 0.0) -> dict[tuple[int | None, bool], dict[str, float]]:  # fmt: skip
    """Scores per (dim, binary) variant; the corpus and queries are encoded once for all variants.

    ``ray_min_docs``: corpora at least this large are encoded with Ray Data (needs ``spec`` and a Ray cluster).
    """
    doc_ids = list(data.corpus)
    doc_texts = data.document_texts(doc_ids)
    query_ids = list(data.queries)
    if not encoder.uses_task_prompts:
        query_task = document_task = None
    if ray_min_docs is not None and len(doc_ids) >= ray_min_docs:
        if spec is None:
            raise ValueError("Ray Data encoding needs the model spec to rebuild the encoder in workers")
        log.info("encoding %d documents of %s with Ray Data (%d workers)", len(doc_ids), data.name, ray_workers)
        doc_raw = encode_with_ray(spec, doc_texts, document_task, ray_workers,
                                  num_gpus=ray_gpus)  # fmt: skip
    else:
        doc_raw = encoder.raw(doc_texts, document_task)
    query_raw = encoder.raw([data.queries[q] for q in query_ids], query_task)
    results = {}
    for dim, binary in variants:
        scores, indices = search(encoder.finalize(query_raw, dim, binary), encoder.finalize(doc_raw, dim, binary))
        run = {q: {doc_ids[j]: float(s) for s, j in zip(scores[r], indices[r], strict=True)}
               for r, q in enumerate(query_ids)}  # fmt: skip
        results[(dim, binary)] = retrieval_metrics(data.qrels, run)
    return results


def evaluate_sts(encoder: TextEncoder, data: PairData, variants: Sequence[tuple[int | None, bool]],
                 task: str = "classification") -> dict[tuple[int | None, bool], dict[str, float]]:
    """Cosine similarity of each pair against the gold scores: Spearman (headline) and Pearson."""
    from scipy.stats import pearsonr, spearmanr

    prefix = task if encoder.uses_task_prompts else None
    raw1, raw2 = encoder.raw(data.sentence1, prefix), encoder.raw(data.sentence2, prefix)
    results = {}
    for dim, binary in variants:
        cosine = (encoder.finalize(raw1, dim, binary) * encoder.finalize(raw2, dim, binary)).sum(1)
        results[(dim, binary)] = {"spearman": float(spearmanr(data.scores, cosine).statistic),
                                  "pearson": float(pearsonr(data.scores, cosine).statistic)}  # fmt: skip
    return results
