"""One attention entry point over packed variable-length sequences, with interchangeable backends.

Tokens of all sequences are concatenated into one ``[T, heads, head_dim]`` tensor and described by
`Segments` (cumulative sequence lengths, as flash-attn's varlen kernels take them). No backend lets a
token attend outside its own segment, and all of them compute the same function:

- ``flash``: flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16); no compute on padding.
- ``varlen``: PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; torch >= 2.10), the
  same unpadded flash kernel without the extra package.
- ``sdpa``: PyTorch's ``scaled_dot_product_attention`` (cuDNN / flash / memory-efficient kernels on GPU,
  the fused CPU kernel on CPU) on segments re-padded to the longest one, with a key mask.
- ``eager``: the textbook softmax(QK^T/sqrt(d))V in fp32, the reference the others are tested against.
- ``auto``: ``flash`` where it runs, else ``varlen`` where it runs, else ``sdpa``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "flash", "varlen", "sdpa", "eager"]
BACKENDS = ("auto", "flash", "varlen", "sdpa", "eager")

try:  # optional GPU extra
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None
try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the torch version
    varlen_attn = None


@dataclass
class Segments:
    """Where each packed sequence starts and ends; built once per forward and shared by every layer."""

    cu_seqlens: torch.Tensor  # [n+1] int32, cumulative lengths
    max_seqlen: int  # longest segment
    seq_index: torch.Tensor  # [T] which segment each token belongs to
    positions: torch.Tensor  # [T] position of each token inside its segment (rotary positions)
    padded_length: int  # length of the padded batch the tokens came from (the reference's NTK length)

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor | list[int], device: torch.device | str | None = None,
                     padded_length: int | None = None) -> Segments:  # fmt: skip
        if not isinstance(lengths, torch.Tensor):
            lengths = torch.tensor(lengths, dtype=torch.int32)
        lengths = lengths.to(device=device if device is not None else lengths.device, dtype=torch.int32)
        if lengths.numel() == 0:
            raise ValueError("no sequences to attend over")
        max_seqlen = int(lengths.max())
        if int(lengths.min()) <= 0:
            raise ValueError("every sequence needs at least one token")
        cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        return cls.from_cu_seqlens(cu_seqlens, max_seqlen, int(lengths.sum()), padded_length)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int, total_tokens: int,
                        padded_length: int | None = None) -> Segments:  # fmt: skip
        """No host sync: ``max_seqlen`` and ``total_tokens`` come from the caller, as flash-attn requires."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_index = torch.repeat_interleave(
            torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths, output_size=total_tokens
        )
        positions = torch.arange(total_tokens, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq_index]
        return cls(cu_seqlens.int(), int(max_seqlen), seq_index, positions, padded_length or int(max_seqlen))

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()


def _half_on_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def flash_available(q: torch.Tensor) -> bool:
    return flash_attn_varlen_func is not None and _half_on_cuda(q)


def torch_varlen_available(q: torch.Tensor) -> bool:
    return varlen_attn is not None and _half_on_cuda(q)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                     backend: Backend = "auto") -> torch.Tensor:  # fmt: skip
    """Bidirectional attention within each segment. q, k, v: [T, heads, head_dim] -> [T, heads, head_dim]."""
    if backend == "auto":
        backend = "flash" if flash_available(q) else "varlen" if torch_varlen_available(q) else "sdpa"
    if backend == "flash":
        if not flash_available(q):
            raise RuntimeError("attention backend 'flash' needs flash-attn installed, a CUDA device and fp16/bf16")
        s = segments
        return flash_attn_varlen_func(q, k, v, s.cu_seqlens, s.cu_seqlens, s.max_seqlen, s.max_seqlen, causal=False)
    if backend == "varlen":
        if not torch_varlen_available(q):
            raise RuntimeError("attention backend 'varlen' needs torch >= 2.10, a CUDA device and fp16/bf16")
        s = segments
        return varlen_attn(q, k, v, s.cu_seqlens, s.cu_seqlens, s.max_seqlen, s.max_seqlen)
    if backend == "sdpa":
        return _padded_attention(q, k, v, segments, _sdpa)
    if backend == "eager":
        return _padded_attention(q, k, v, segments, _eager)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def _padded_attention(q, k, v, segments: Segments, kernel) -> torch.Tensor:
    """Re-pad to [n, heads, S, d], run a dense kernel with a key mask, and gather the real tokens back."""
    n, S = segments.num_sequences, segments.max_seqlen
    index = (segments.seq_index, segments.positions)

    def pad(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(n, S, *x.shape[1:])
        out[index] = x
        return out.transpose(1, 2)  # (n, heads, S, d)

    key_mask = torch.arange(S, device=q.device)[None, :] < segments.lengths[:, None]  # (n, S)
    out = kernel(pad(q), pad(k), pad(v), key_mask[:, None, None, :])
    return out.transpose(1, 2)[index]


def _sdpa(q, k, v, key_mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


def _eager(q, k, v, key_mask):
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~key_mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)
