"""MTEB through the `mteb` library: our encoder as an mteb encoder, Hub tasks by name, local tasks by path.

Prompts follow the Nomic evaluation (spec §8, also mteb's own nomic prompts): Retrieval queries
``search_query``, documents ``search_document`` (QuoraRetrieval documents are queries too); Clustering
``clustering``; everything else ``classification``. sentence-transformers baselines get no prompt unless the
model defines one under those names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.data import DataError, load_beir, load_pairs, task_name
from evaluation.encoders import TextEncoder

log = logging.getLogger(__name__)

QUERY_DOCUMENT_TASKS = {"QuoraRetrieval", "NanoQuoraRetrieval"}  # symmetric: documents are questions too


def nomic_task(task_type: str, task_name: str, is_query: bool) -> str:
    """The Nomic prefix for an MTEB task type and side (spec §8)."""
    if task_type in ("Retrieval", "InstructionRetrieval"):
        return "search_query" if is_query or task_name in QUERY_DOCUMENT_TASKS else "search_document"
    if task_type == "Clustering":
        return "clustering"
    return "classification"


def make_mteb_encoder(encoder: TextEncoder, dim: int | None = None, binary: bool = False) -> Any:
    """Wrap ``encoder`` for `mteb.evaluate`; ``dim`` / ``binary`` select a Matryoshka / quantised variant."""
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType

    class NomicMtebEncoder(AbsEncoder):
        def __init__(self) -> None:
            name = encoder.name if encoder.name.count("/") == 1 and not Path(encoder.name).exists() else (
                "local/" + Path(encoder.name).name)  # fmt: skip
            self.mteb_model_meta = ModelMeta.create_empty(overwrites={
                "name": name, "revision": encoder.revision, "similarity_fn_name": ScoringFunction.COSINE,
                "max_tokens": encoder.max_length, "embed_dim": dim or encoder.hidden_size})  # fmt: skip

        def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
                   **kwargs: Any) -> np.ndarray:  # fmt: skip
            texts = [text for batch in inputs for text in batch["text"]]
            task = nomic_task(task_metadata.type, task_metadata.name, prompt_type == PromptType.query)
            return encoder.encode(texts, task if encoder.uses_task_prompts else None, dim, binary)

    return NomicMtebEncoder()


def _local_metadata(template_name: str, name: str, path: Path, revision: str):
    import mteb

    template = mteb.get_task(template_name).metadata
    return template.model_copy(update={
        "name": name, "dataset": {"path": str(path), "revision": revision}, "description": f"local task from {path}",
        "reference": None, "bibtex_citation": "", "prompt": None, "eval_splits": ["test"]})  # fmt: skip


def local_retrieval_task(folder: Path, name: str | None = None, limit_queries: int | None = None,
                         limit_corpus: int | None = None) -> Any:  # fmt: skip
    """An mteb retrieval task read from a BEIR folder (checked by `load_beir`; same join and qrels as the Hub)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    data = load_beir(folder, name=name, limit_queries=limit_queries, limit_corpus=limit_corpus)
    metadata = _local_metadata("SciFact", data.name, folder, "local")

    class LocalRetrieval(AbsTaskRetrieval):
        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            ids = list(data.corpus)
            corpus = Dataset.from_dict({"id": ids, "title": [data.corpus[i]["title"] for i in ids],
                                        "text": [data.corpus[i]["text"] for i in ids]})  # fmt: skip
            queries = Dataset.from_dict({"id": list(data.queries), "text": list(data.queries.values())})
            self.dataset = {"default": {"test": {"corpus": corpus, "queries": queries, "relevant_docs": data.qrels,
                                                 "top_ranked": None}}}  # fmt: skip
            self.data_loaded = True

    LocalRetrieval.metadata = metadata
    return LocalRetrieval()


def local_sts_task(file: Path, name: str | None = None, limit: int | None = None) -> Any:
    """An mteb STS task read from a pairs file (0-5 scores, as STSBenchmark)."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS

    data = load_pairs(file, name=name, limit=limit)
    metadata = _local_metadata("STSBenchmark", data.name, file, "local")
    low, high = min(data.scores), max(data.scores)

    class LocalSTS(AbsTaskSTS):
        min_score = min(0.0, low)
        max_score = max(5.0, high)

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": data.sentence1, "sentence2": data.sentence2, "score": data.scores})})  # fmt: skip
            self.data_loaded = True

    LocalSTS.metadata = metadata
    return LocalSTS()


def resolve_tasks(specs: Sequence[str], limit: int | None = None) -> list[Any]:
    """``NAME`` (an MTEB task or benchmark), ``PATH`` or ``NAME=PATH`` (a BEIR folder or an STS pairs file)."""
    import mteb

    from ops.io import local_copy

    tasks = []
    for spec in specs:
        name, _, path_text = spec.rpartition("=") if "=" in spec else (None, "", spec)
        path = Path(local_copy(path_text))  # s3:// / gs:// folders and files are copied to the local cache
        if path.is_dir():
            tasks.append(local_retrieval_task(path, name or None, limit_queries=limit,
                                              limit_corpus=limit * 20 if limit else None))  # fmt: skip
        elif path.is_file():
            tasks.append(local_sts_task(path, name or task_name(path), limit=limit))
        elif path_text.startswith((".", "/")) or path.suffix in (".tsv", ".jsonl"):
            raise DataError(f"{path}: no such task folder or file")
        else:
            try:
                tasks.extend(mteb.get_benchmark(path_text).tasks)
            except (KeyError, ValueError):
                tasks.append(mteb.get_task(path_text))
    return tasks


# what we log per task besides main_score (MTEB computes dozens; these are the ones people compare)
KEPT_METRICS = {"main_score", "ndcg_at_10", "ndcg_at_100", "map_at_10", "mrr_at_10", "recall_at_10", "recall_at_100",
                "recall_at_1000", "cosine_spearman", "cosine_pearson", "accuracy", "f1", "ap", "v_measure",
                "similarity_ap", "max_ap", "map", "mrr"}


def _flat_scores(scores: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in scores.items() if k in KEPT_METRICS and isinstance(v, (int, float))
            and not isinstance(v, bool) and not np.isnan(v)}  # fmt: skip


def evaluate_mteb(encoder: TextEncoder, tasks: Sequence[Any], variants: Sequence[tuple[int | None, bool]],
                  batch_size: int = 32) -> dict[tuple[int | None, bool], dict[str, dict[str, float]]]:  # fmt: skip
    """Run every task per (dim, binary) variant -> {variant: {task name: {metric: value}}} (test split, or the
    task's first eval split, averaged over subsets)."""
    import mteb

    results: dict[tuple[int | None, bool], dict[str, dict[str, float]]] = {}
    for dim, binary in variants:
        model = make_mteb_encoder(encoder, dim, binary)
        per_task: dict[str, dict[str, float]] = {}
        for task in tasks:
            outcome = mteb.evaluate(model, task, cache=None, show_progress_bar=False,
                                    encode_kwargs={"batch_size": batch_size, "show_progress_bar": False})  # fmt: skip
            for task_result in outcome.task_results:
                split = "test" if "test" in task_result.scores else next(iter(task_result.scores))
                subsets = [_flat_scores(s) for s in task_result.scores[split]]
                keys = set.intersection(*(set(s) for s in subsets))
                per_task[task_result.task_name] = {k: float(np.mean([s[k] for s in subsets])) for k in sorted(keys)}
        results[(dim, binary)] = per_task
    return results
