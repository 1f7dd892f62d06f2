"""Sentence embeddings: task prefixes, mean pooling over real tokens, the v1 / v1.5 / binary recipes.

Texts are tokenized without padding, sorted by length and packed into token-budget batches, so no
compute is spent on padding and an embedding never depends on which texts share its batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from nomicbert.attention import Segments, pack_sequences
from nomicbert.config import TASK_PREFIXES, NomicBertConfig, check_dim
from nomicbert.model import NomicBertModel

BinaryFormat = Literal["packed", "float"]


def add_prefix(texts: Sequence[str], task: str | None) -> list[str]:
    """``"search_query"`` -> ``"search_query: <text>"``; None leaves texts as they are."""
    if task is None:
        return list(texts)
    if task not in TASK_PREFIXES:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASK_PREFIXES)} or none")
    return [TASK_PREFIXES[task] + t for t in texts]


def mean_pool_packed(hidden: torch.Tensor, segments: Segments) -> torch.Tensor:
    """[T, H] packed hidden states -> [n, H] means over each sequence's tokens (fp32)."""
    sums = hidden.new_zeros(segments.num_sequences, hidden.shape[-1], dtype=torch.float32)
    sums.index_add_(0, segments.seq_index, hidden.float())
    return sums / segments.lengths[:, None].float()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S, H] padded hidden states -> [B, H] masked means (denominator clamped as in sentence-transformers)."""
    mask = attention_mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def finalize(pooled: torch.Tensor, recipe: str = "v1", dim: int | None = None, binary: bool = False,
             normalize: bool = True) -> torch.Tensor:  # fmt: skip
    """Pooled [n, H] -> embeddings. v1: L2. v1.5 (or any ``dim``/``binary``): weightless LayerNorm (eps 1e-5),
    binary threshold if asked, first ``dim`` features, then L2 (spec §1.3).

    Degenerate rows are errors, not silent zeros: a non-finite pooled row (an overflow), or a float row of norm 0
    that L2 cannot scale. A binary row with no positive bit is a valid code; its float form stays all zeros
    (cosine 0 to everything), which is why `pack_bits` is the binary output of the CLI."""
    check_dim(dim, pooled.shape[-1])
    x = pooled.float()
    _fail_on_rows(~torch.isfinite(x).all(-1), "are not finite (an overflow: run in fp32)")
    if recipe == "v1.5" or dim is not None or binary:
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-5)
        if binary:
            x = (x > 0).float()
        x = x[:, :dim] if dim is not None else x
    if not normalize:
        return x
    if not binary:
        _fail_on_rows(x.norm(dim=-1) == 0, "are all zero and cannot be L2-normalised")
    return F.normalize(x, dim=-1)


def _fail_on_rows(bad: torch.Tensor, what: str) -> None:
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{len(rows)} pooled embeddings (rows {rows[:10]}{' ...' if len(rows) > 10 else ''}) {what}")


def pack_bits(bits: torch.Tensor | np.ndarray) -> np.ndarray:
    """[n, d] {0, 1} -> uint8 [n, ceil(d / 8)], ``np.packbits`` (big-endian bits, the last byte zero-padded):
    1/32 of float32. Hamming distance = popcount(a ^ b), e.g. ``np.bitwise_count(a ^ b).sum(-1)``."""
    array = bits.numpy() if isinstance(bits, torch.Tensor) else np.asarray(bits)
    return np.packbits(array > 0, axis=-1)


def binary_format(binary: bool | str) -> BinaryFormat | None:
    """``False`` -> None (float embeddings); ``True`` or ``"packed"`` -> packed bits; ``"float"`` -> {0,1} + L2."""
    if binary is False or binary is None:
        return None
    if binary is True:
        return "packed"
    if binary not in ("packed", "float"):
        raise ValueError(f"binary must be True, False, 'packed' or 'float' (got {binary!r})")
    return binary


class Embedder:
    """Encode texts with a NomicBert encoder.

    Example::

        embedder = Embedder.from_pretrained("nomic-ai/nomic-embed-text-v1.5")
        vectors = embedder.encode(["what is rotary?"], task="search_query", dim=256)  # (1, 256) float32
    """

    def __init__(self, model: NomicBertModel, tokenizer, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_length: int = 512, batch_tokens: int = 32768,
                 batch_size: int = 256):  # fmt: skip
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_tokens = batch_tokens
        self.batch_size = batch_size

    @property
    def config(self) -> NomicBertConfig:
        return self.model.config

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, rotary_scaling_factor: float | None = None,
                        **kwargs) -> Embedder:  # fmt: skip
        from nomicbert.checkpoint import load_model, resolve
        from nomicbert.tokenizer import has_tokenizer_files, load_tokenizer

        folder = resolve(source)
        overrides = {"rotary_scaling_factor": rotary_scaling_factor} if rotary_scaling_factor else {}
        model = load_model(folder, kind="encoder", **overrides)
        tokenizer = load_tokenizer(folder if has_tokenizer_files(folder) else None)
        return cls(model, tokenizer, **kwargs)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if len(texts) and not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings")
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                 add_special_tokens=True, return_attention_mask=False)  # fmt: skip
        return encoded["input_ids"]

    @torch.inference_mode()
    def pool(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean-pooled hidden states [n, H] (fp32, on the CPU) in input order, batched by a token budget. Batches
        are packed on the host and their results stay on the device until one copy back at the end."""
        n = len(token_ids)
        order = sorted(range(n), key=lambda i: -len(token_ids[i]))
        pooled, start = [], 0
        while start < n:
            longest = max(len(token_ids[order[start]]), 1)
            count = max(1, min(self.batch_size, self.batch_tokens // longest, n - start))
            ids, segments = pack_sequences([token_ids[i] for i in order[start : start + count]], self.device)
            pooled.append(mean_pool_packed(self.model.forward_packed(ids, segments), segments))
            start += count
        out = torch.empty(n, self.config.hidden_size, dtype=torch.float32)
        out[order] = torch.cat(pooled).cpu()
        return out

    def encode(self, texts: Sequence[str], task: str | None = None, dim: int | None = None,
               binary: bool | BinaryFormat = False, normalize: bool = True) -> np.ndarray:  # fmt: skip
        """float32 [len(texts), dim or hidden] in input order. ``binary=True``/``"packed"``: uint8
        [len(texts), ceil(d / 8)], the sign bits of the v1.5 features packed by `pack_bits`; ``binary="float"``:
        the reference's evaluation form, L2-normalised {0, 1} floats."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        form = binary_format(binary)
        width = dim or self.config.hidden_size
        if len(texts) == 0:
            if form == "packed":
                return np.zeros((0, (width + 7) // 8), dtype=np.uint8)
            return np.zeros((0, width), dtype=np.float32)
        token_ids = self.tokenize(add_prefix(texts, task))
        pooled = self.pool(token_ids)
        out = finalize(pooled, self.config.embedding_recipe, dim, form is not None, normalize and form != "packed")
        return pack_bits(out) if form == "packed" else out.numpy()
