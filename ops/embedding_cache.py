"""A disk cache of raw text embeddings, shared by the mining teacher and the evaluation.

Adapting a published model encodes the same corpus with the same model twice: once as the hard-negative teacher
(`ops.teacher`) and once when `evaluation` scores the starting model on that corpus. Both look here first.
An entry is keyed by everything that changes the vector: the content of the model's files (`model_fingerprint`),
the token limit, the device and precision, the prompt prepended to the text, and the text itself (sha256); so a
changed weight file, length, precision or prompt is another key, never a stale hit. Stored vectors are raw (not
normalised); each reader applies its own recipe.

Layout: ``<root>/<settings key>/settings.json`` (what the key stands for) + ``part-*.npz`` (``keys`` [n, 32] uint8,
``emb`` [n, H] float32), each part written to a temp name and renamed, so concurrent writers (Ray actors) never
leave a half-written part. The root must be a local or shared folder all writers see.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SKIPPED_DIRS = {"training_state"}  # optimizer state beside an exported model: not part of what it encodes


def model_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over every file of a model folder (relative path + content), ``training_state/`` left out."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder)
        if relative.parts[0] in SKIPPED_DIRS:
            continue
        digest.update(str(relative).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def text_keys(texts: Sequence[str]) -> np.ndarray:
    return np.frombuffer(b"".join(hashlib.sha256(t.encode()).digest() for t in texts), np.uint8).reshape(-1, 32)


class EmbeddingCache:
    """Raw embeddings of one (model, max_length, precision, prompt) setting under ``root``."""

    def __init__(self, root: str | os.PathLike, model: str, max_length: int, precision: str, prompt: str = ""):
        """``model``: the folder's `model_fingerprint`; ``precision``: device and dtype, e.g. "cpu-fp32"."""
        self.settings = {"model": model, "max_length": int(max_length),
                         "precision": precision, "prompt": prompt}  # fmt: skip
        key = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = Path(root) / key
        self._rows: dict[bytes, np.ndarray] = {}
        self._parts_read: set[str] = set()

    def _refresh(self) -> None:
        """Read parts written since the last look (by this or another process)."""
        if not self.folder.is_dir():
            return
        for part in sorted(self.folder.glob("part-*.npz")):
            if part.name in self._parts_read:
                continue
            with np.load(part) as stored:
                self._rows.update(zip(map(bytes, stored["keys"]), stored["emb"]))
            self._parts_read.add(part.name)

    def lookup(self, texts: Sequence[str]) -> tuple[dict[int, np.ndarray], list[int]]:
        """({index: vector} of the texts found, indices of the missing ones)."""
        self._refresh()
        found, missing = {}, []
        for i, key in enumerate(map(bytes, text_keys(texts))):
            if key in self._rows:
                found[i] = self._rows[key]
            else:
                missing.append(i)
        return found, missing

    def store(self, texts: Sequence[str], emb: np.ndarray) -> None:
        if not len(texts):
            return
        if len(texts) != len(emb):
            raise ValueError(f"{len(texts)} texts but {len(emb)} embeddings")
        self.folder.mkdir(parents=True, exist_ok=True)
        settings = self.folder / "settings.json"
        if not settings.exists():
            write_atomically(settings, lambda path: path.write_text(json.dumps(self.settings, indent=2)))
        keys = text_keys(texts)
        emb = np.asarray(emb, dtype=np.float32)
        write_atomically(self.folder / f"part-{uuid.uuid4().hex}.npz",
                         lambda path: np.savez(path, keys=keys, emb=emb))  # fmt: skip
        self._rows.update(zip(map(bytes, keys), emb))

    def embed(self, texts: Sequence[str], compute) -> np.ndarray:
        """``compute(missing texts) -> [m, H]`` for the texts not cached yet (stored), all rows in input order."""
        found, missing = self.lookup(texts)
        if missing:
            computed = np.asarray(compute([texts[i] for i in missing]), dtype=np.float32)
            self.store([texts[i] for i in missing], computed)
            found.update(zip(missing, computed))
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[i] for i in range(len(texts))])


def write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
