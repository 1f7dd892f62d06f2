"""One encoder interface over our checkpoints (NomicBert) and sentence-transformers baselines.

Every suite encodes through `TextEncoder`: ``raw`` embeddings are computed once per (task prefix, text) and
cached, and each Matryoshka dim / binary variant is derived from them by `finalize`, so the dims sweep costs
one encoding pass, not six.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NOMIC_TASKS = ("search_query", "search_document", "classification", "clustering")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an encoder in another process (Ray Data workers)."""

    source: str
    max_length: int | None = None
    rotary_scaling_factor: float | None = None
    device: str | None = None
    cpu_bf16: bool = False  # bf16 autocast on CPU (sentence-transformers models; fast with AVX-512 BF16 / AMX)


def is_nomic_checkpoint(source: str | os.PathLike) -> bool:
    """Our checkpoints and the published Nomic ones carry ``model_type: nomic_bert`` in config.json."""
    path = Path(source)
    if path.is_dir():
        config = path / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "nomic_bert"
    return str(source).startswith("nomic-ai/")


def model_revision(source: str | os.PathLike) -> str:
    """A content fingerprint of a local folder (config + weights), or the Hub snapshot hash of a cached id."""
    path = Path(source)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(source), local_files_only=True))
        except Exception:  # not in the local cache: the revision is whatever the Hub serves
            return "hub:main"
        return path.name
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


class TextEncoder:
    """Base class: ``raw(texts, task)`` -> cached float32 [n, H]; ``encode`` adds dim / binary / L2."""

    name: str
    revision: str
    max_length: int
    hidden_size: int
    is_nomic: bool = False

    def __init__(self) -> None:
        self._cache: dict[tuple[str | None, str], np.ndarray] = {}
        self._disk: dict[str | None, object] = {}
        self.embedding_cache: str | None = None  # a folder shared with the mining teacher (`ops.embedding_cache`)
        self.folder: str | None = None  # the model's local folder (what the disk cache fingerprints)
        self.precision = "cpu-fp32"

    def prompt(self, task: str | None) -> str:
        """The text prepended for ``task``."""
        raise NotImplementedError

    @property
    def uses_task_prompts(self) -> bool:
        """Whether the suites pass task names (search_query, ...): Nomic models, and any model that defines them."""
        return self.is_nomic

    def _raw(self, texts: Sequence[str], task: str | None) -> np.ndarray:
        raise NotImplementedError

    def _finalize(self, raw: np.ndarray, dim: int | None, binary: bool) -> np.ndarray:
        raise NotImplementedError

    def raw(self, texts: Sequence[str], task: str | None = None) -> np.ndarray:
        """Un-finalised embeddings in input order; texts seen before with the same task are not re-encoded."""
        if task is not None and task not in NOMIC_TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {NOMIC_TASKS} or None")
        missing = list(dict.fromkeys(t for t in texts if (task, t) not in self._cache))
        if missing:
            disk = self._disk_cache(task)
            rows = self._raw(missing, task) if disk is None else disk.embed(missing, lambda m: self._raw(m, task))
            for text, row in zip(missing, rows, strict=True):
                self._cache[(task, text)] = row
        if not texts:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        return np.stack([self._cache[(task, t)] for t in texts])

    def _disk_cache(self, task: str | None):
        if self.embedding_cache is None or self.folder is None:
            return None
        if task not in self._disk:
            from ops.embedding_cache import EmbeddingCache, model_fingerprint

            fingerprint = self._disk.setdefault("fingerprint", model_fingerprint(self.folder))
            self._disk[task] = EmbeddingCache(self.embedding_cache, fingerprint, self.max_length, self.precision,
                                              self.prompt(task))  # fmt: skip
        return self._disk[task]

    def encode(self, texts: Sequence[str], task: str | None = None, dim: int | None = None,
               binary: bool = False) -> np.ndarray:  # fmt: skip
        """L2-normalised float32 [n, dim or H] (cosine = dot product)."""
        if dim is not None and dim > self.hidden_size:
            raise ValueError(f"dim {dim} exceeds the embedding size {self.hidden_size} of {self.name}")
        return self._finalize(self.raw(texts, task), dim, binary)

    def finalize(self, raw: np.ndarray, dim: int | None = None, binary: bool = False) -> np.ndarray:
        return self._finalize(raw, dim, binary)

    def prefetch(self, work: Sequence[tuple[str | None, Sequence[str]]]) -> None:
        """Encode every (task, texts) a suite will ask for at once; in-process encoding gains nothing from it."""

    def clear_cache(self) -> None:
        self._cache.clear()
        self._disk.clear()


class NomicEncoder(TextEncoder):
    """A NomicBert checkpoint through `nomicbert.embed.Embedder`: task prefixes, the v1 / v1.5 recipes."""

    is_nomic = True

    def __init__(self, spec: ModelSpec):
        super().__init__()
        from nomicbert.embed import Embedder

        self.embedder = Embedder.from_pretrained(spec.source, rotary_scaling_factor=spec.rotary_scaling_factor,
                                                 device=spec.device)  # fmt: skip
        self.embedder.max_length = spec.max_length or 512  # the MTEB setting of the Nomic papers (spec §8)
        self.name, self.revision = str(spec.source), model_revision(spec.source)
        self.max_length = self.embedder.max_length
        self.hidden_size = self.embedder.config.hidden_size
        self.folder = str(spec.source) if Path(spec.source).is_dir() else None
        self.precision = f"{self.embedder.device.type}-{str(self.embedder.dtype).removeprefix('torch.')}"
        if spec.cpu_bf16:
            raise ValueError("cpu_bf16 is for sentence-transformers models; a Nomic model runs in its own dtype")

    def prompt(self, task: str | None) -> str:
        from nomicbert.embed import add_prefix

        return add_prefix([""], task)[0]

    def _raw(self, texts: Sequence[str], task: str | None) -> np.ndarray:
        from nomicbert.embed import add_prefix

        return self.embedder.pool(self.embedder.tokenize(add_prefix(texts, task))).numpy()

    def _finalize(self, raw: np.ndarray, dim: int | None, binary: bool) -> np.ndarray:
        return finalize_nomic(raw, self.embedder.config.embedding_recipe, dim, binary)

    def set_max_length(self, max_length: int) -> None:
        self.embedder.max_length = self.max_length = max_length
        self.clear_cache()


class SentenceTransformerEncoder(TextEncoder):
    """A sentence-transformers model (name or folder); a task prompt is used only if the model defines it."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        from sentence_transformers import SentenceTransformer

        device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = SentenceTransformer(str(spec.source), device=device)
        if device.startswith("cuda"):
            self.model.to(torch.bfloat16)
        self.autocast = spec.cpu_bf16 and device == "cpu"  # fp32 weights, bf16 matmuls
        if spec.max_length:
            self.model.max_seq_length = spec.max_length
        self.name, self.revision = str(spec.source), model_revision(spec.source)
        self.max_length = int(self.model.max_seq_length)
        self.hidden_size = int(self.model.get_embedding_dimension())
        self.folder = local_folder(str(spec.source))
        self.precision = f"{device.split(':')[0]}-{'bf16' if device.startswith('cuda') or self.autocast else 'fp32'}"

    def prompt(self, task: str | None) -> str:
        return (self.model.prompts or {}).get(task, "") if task is not None else ""

    @property
    def uses_task_prompts(self) -> bool:
        """A model trained with the task prompts (e.g. adapted by our stages) is evaluated with them."""
        return {"search_query", "search_document"} <= set(self.model.prompts or {})

    def _raw(self, texts: Sequence[str], task: str | None) -> np.ndarray:
        prompt = task if task is not None and task in (self.model.prompts or {}) else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model.encode(list(texts), prompt_name=prompt, batch_size=32, convert_to_tensor=True,
                                    normalize_embeddings=False, show_progress_bar=False)  # fmt: skip
        out = out.float().cpu().numpy()
        return np.asarray(out, dtype=np.float32)

    def _finalize(self, raw: np.ndarray, dim: int | None, binary: bool) -> np.ndarray:
        return finalize_plain(raw, dim, binary)

    def set_max_length(self, max_length: int) -> None:
        limit = int(self.model[0].auto_model.config.max_position_embeddings)
        if max_length > limit:
            log.warning("%s has %d positions; encoding at %d tokens instead of %d", self.name, limit, limit,
                        max_length)  # fmt: skip
        self.model.max_seq_length = self.max_length = min(max_length, limit)
        self.clear_cache()


def local_folder(source: str) -> str | None:
    """A model folder, or a Hub id's snapshot already in the local cache; None when neither."""
    if Path(source).is_dir():
        return source
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, local_files_only=True)
    except Exception:  # not downloaded: nothing to fingerprint
        return None


def finalize_nomic(raw: np.ndarray, recipe: str, dim: int | None, binary: bool) -> np.ndarray:
    """A Nomic model's raw (pooled) embeddings -> its recipe (v1 / v1.5 LayerNorm), first ``dim`` dims, L2."""
    from nomicbert.embed import finalize

    return finalize(torch.from_numpy(raw), recipe, dim, binary).numpy()


def finalize_plain(raw: np.ndarray, dim: int | None, binary: bool) -> np.ndarray:
    """A sentence-transformers model's embeddings -> first ``dim`` dims (or sign bits), L2."""
    x = torch.from_numpy(raw[:, :dim] if dim is not None else raw)
    if binary:
        x = (x > 0).float()
    return F.normalize(x.float(), dim=-1).numpy()


@dataclass(frozen=True)
class RayPool:
    """The Ray Data actor pool that encodes: ``workers`` actors, each holding the model once on ``num_gpus`` (GPU
    nodes when > 0) and ``num_cpus``; ``batch_size`` texts per call."""

    workers: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 256


class _EncodeBatch:
    """Ray Data actor: loads the model once, encodes batches of (task, text) rows ("" = no task), through the
    shared embedding cache when there is one."""

    def __init__(self, spec: ModelSpec, embedding_cache: str | None = None):
        self.encoder = load_encoder(spec)
        self.encoder.embedding_cache = embedding_cache

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tasks, texts = [str(t) or None for t in batch["task"]], list(batch["text"])
        raw: list[np.ndarray] = [np.empty(0)] * len(texts)
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            for i, row in zip(rows, self.encoder.raw([texts[i] for i in rows], task), strict=True):
                raw[i] = row
        return {"row": batch["row"], "raw": np.stack(raw)}


def encode_items_with_ray(spec: ModelSpec, items: Sequence[tuple[str | None, str]], workers: int,
                          batch_size: int = 512, num_gpus: float = 0.0, num_cpus: float | None = None,
                          embedding_cache: str | None = None) -> np.ndarray:  # fmt: skip
    """Raw embeddings of (task, text) ``items`` (input order) from ``workers`` Ray Data actors (the teacher's
    machinery, `ops.teacher.embed_dataset`): one job, so the actors load the model once for all of them. Rows are
    sorted by length before batching so each batch packs similar lengths."""
    import ray

    order = sorted(range(len(items)), key=lambda i: len(items[i][1]))
    rows = ray.data.from_items([{"row": i, "task": items[i][0] or "", "text": items[i][1]} for i in order])
    out = rows.map_batches(_EncodeBatch, fn_constructor_args=(spec, embedding_cache), batch_size=batch_size,
                           compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=num_gpus or None,
                           num_cpus=num_cpus if num_cpus is not None else 0 if num_gpus else 1)  # fmt: skip
    done = out.take_all()
    result = np.zeros((len(items), len(done[0]["raw"])), dtype=np.float32)
    for row in done:
        result[row["row"]] = row["raw"]
    return result


def encode_with_ray(spec: ModelSpec, texts: Sequence[str], task: str | None, workers: int, batch_size: int = 512,
                    num_gpus: float = 0.0, num_cpus: float | None = None) -> np.ndarray:  # fmt: skip
    """Raw embeddings of ``texts`` (input order), all with ``task``, from ``workers`` Ray Data actors."""
    return encode_items_with_ray(spec, [(task, text) for text in texts], workers, batch_size, num_gpus, num_cpus)


def describe(spec: ModelSpec) -> dict[str, object]:
    """What the driver needs to know of a model without holding it (run as a Ray task beside the pool)."""
    encoder = load_encoder(spec)
    about = {"name": encoder.name, "revision": encoder.revision, "max_length": encoder.max_length,
             "hidden_size": encoder.hidden_size, "is_nomic": encoder.is_nomic,
             "uses_task_prompts": encoder.uses_task_prompts}  # fmt: skip
    if isinstance(encoder, NomicEncoder):
        about.update(recipe=encoder.embedder.config.embedding_recipe, max_positions=None)
    else:
        about.update(recipe=None, max_positions=int(encoder.model[0].auto_model.config.max_position_embeddings))
    return about


class RayDataEncoder(TextEncoder):
    """Encodes in a Ray Data actor pool (`RayPool`: GPU actors when it asks for GPUs), never in this process; only
    the raw embeddings come back, and every Matryoshka dim / binary variant is derived from them here."""

    def __init__(self, spec: ModelSpec, pool: RayPool):
        super().__init__()
        import ray

        self.spec, self.pool = spec, pool
        about = ray.get(ray.remote(describe).options(num_cpus=pool.num_cpus, num_gpus=pool.num_gpus).remote(spec))
        self.name, self.revision = str(about["name"]), str(about["revision"])
        self.max_length, self.hidden_size = int(about["max_length"]), int(about["hidden_size"])
        self.is_nomic, self._prompts = bool(about["is_nomic"]), bool(about["uses_task_prompts"])
        self.recipe, self.max_positions = about["recipe"], about["max_positions"]

    @property
    def uses_task_prompts(self) -> bool:
        return self._prompts

    def _raw(self, texts: Sequence[str], task: str | None) -> np.ndarray:
        return self._encode([(task, text) for text in texts])

    def _encode(self, items: Sequence[tuple[str | None, str]]) -> np.ndarray:
        return encode_items_with_ray(self.spec, items, self.pool.workers, self.pool.batch_size, self.pool.num_gpus,
                                     self.pool.num_cpus, self.embedding_cache)  # fmt: skip

    def prefetch(self, work: Sequence[tuple[str | None, Sequence[str]]]) -> None:
        """One Ray Data job for everything the suites will ask (an actor pool starts and loads the model once)."""
        missing = list(dict.fromkeys((task, t) for task, texts in work for t in texts if (task, t) not in self._cache))
        if missing:
            self._cache.update(zip(missing, self._encode(missing), strict=True))

    def _finalize(self, raw: np.ndarray, dim: int | None, binary: bool) -> np.ndarray:
        return finalize_nomic(raw, self.recipe, dim, binary) if self.is_nomic else finalize_plain(raw, dim, binary)

    def set_max_length(self, max_length: int) -> None:
        if self.max_positions is not None and max_length > self.max_positions:
            log.warning("%s has %d positions; encoding at %d tokens instead of %d", self.name, self.max_positions,
                        self.max_positions, max_length)  # fmt: skip
            max_length = self.max_positions
        self.spec, self.max_length = replace(self.spec, max_length=max_length), max_length
        self.clear_cache()


def load_encoder(spec: ModelSpec | str, pool: RayPool | None = None) -> TextEncoder:
    """Our / Nomic checkpoints -> `NomicEncoder`; anything else -> `SentenceTransformerEncoder`; with ``pool``, the
    same model in a Ray Data actor pool (`RayDataEncoder`)."""
    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    if pool is not None:
        return RayDataEncoder(spec, pool)
    if not Path(spec.source).exists() and str(spec.source).startswith((".", "/")):
        raise FileNotFoundError(f"model folder {spec.source} does not exist")
    if is_nomic_checkpoint(spec.source):
        return NomicEncoder(spec)
    return SentenceTransformerEncoder(spec)
