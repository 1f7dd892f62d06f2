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

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Backend = Literal["auto", "flash", "varlen", "sdpa", "eager"]
BACKENDS = ("auto", "flash", "varlen", "sdpa", "eager")
log = logging.getLogger("nomicbert.attention")

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
    def from_lengths(cls, lengths: torch.Tensor | Sequence[int], device: torch.device | str | None = None,
                     padded_length: int | None = None) -> Segments:  # fmt: skip
        """Lengths given on the host (a list, numpy array or CPU tensor): the longest, the total and the offsets
        are computed there and only ``cu_seqlens`` is moved, so building segments never waits for the device."""
        host = torch.as_tensor(lengths, dtype=torch.int32, device="cpu") if not isinstance(lengths, torch.Tensor) \
            else lengths.to("cpu", torch.int32)  # fmt: skip
        if host.numel() == 0:
            raise ValueError("no sequences to attend over")
        if int(host.min()) <= 0:
            raise ValueError("every sequence needs at least one token")
        cu_seqlens = F.pad(torch.cumsum(host, 0, dtype=torch.int32), (1, 0))
        target = torch.device(device) if device is not None else torch.device("cpu")
        return cls.from_cu_seqlens(host_to_device(cu_seqlens, target), int(host.max()), int(host.sum()), padded_length)

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


def pack_sequences(token_lists: Sequence[Sequence[int]], device: torch.device | str | None = None,
                   ) -> tuple[torch.Tensor, Segments]:  # fmt: skip
    """Token-id lists -> (ids [T] on ``device``, `Segments`), concatenated on the host per sequence (no Python loop
    over tokens) and moved without making the host wait."""
    if not len(token_lists):
        raise ValueError("no sequences to pack")
    ids = torch.from_numpy(np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists]))
    target = torch.device(device) if device is not None else torch.device("cpu")
    return host_to_device(ids, target), Segments.from_lengths([len(t) for t in token_lists], target)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait (through pinned memory on CUDA)."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------
# Backend dispatch: which kernel runs, and why the faster ones could not
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendChoice:
    requested: str  # the model's attn_backend
    chosen: str  # the kernel that ran
    device: str  # e.g. "cuda", "cpu"
    dtype: str  # q's dtype, e.g. "torch.bfloat16"
    reason: str  # why the faster kernels were passed over ("" when the first choice ran)


_choices: dict[tuple[str, str, str], BackendChoice] = {}


def backend_choices() -> list[BackendChoice]:
    """Every (requested backend, device, dtype) seen in this process and what ran for it, in first-seen order."""
    return list(_choices.values())


def reset_backend_choices() -> None:
    _choices.clear()


def unavailable_reason(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why ``backend`` cannot run on these inputs (None if it can). Only the padding-free kernels have limits."""
    if backend == "flash" and flash_attn_varlen_func is None:
        return "flash-attn is not installed (pip install '.[gpu]')"
    if backend == "varlen" and varlen_attn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch >= 2.10)"
    if backend in ("flash", "varlen"):
        if not q.is_cuda:
            return f"the tensors are on {q.device.type}; the kernel needs CUDA"
        if not (q.dtype == k.dtype == v.dtype):
            return f"q, k and v differ in dtype ({q.dtype}, {k.dtype}, {v.dtype})"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"the tensors are {q.dtype}; the kernel needs fp16/bf16 (run.precision: bf16, or cast the model)"
    return None


def resolve_backend(requested: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """``auto`` -> flash, else varlen, else sdpa; an explicit backend that cannot run raises with the reason. The
    choice is recorded (`backend_choices`) and logged once per (request, device, dtype); ``auto`` falling back to
    the padded kernel on CUDA is a warning, since training then pays for padding."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    reasons = []
    if requested == "auto":
        chosen = "sdpa"
        for candidate in ("flash", "varlen"):
            reason = unavailable_reason(candidate, q, k, v)
            if reason is None:
                chosen = candidate
                break
            reasons.append(f"{candidate}: {reason}")
    else:
        reason = unavailable_reason(requested, q, k, v)
        if reason is not None:
            raise RuntimeError(f"attention backend {requested!r} cannot run: {reason}")
        chosen = requested
    key = (requested, q.device.type, str(q.dtype))
    if key in _choices:
        return chosen
    choice = _choices[key] = BackendChoice(requested, chosen, q.device.type, str(q.dtype), "; ".join(reasons))
    message = "attention backend %s on %s %s -> %s%s"
    args = (requested, choice.device, choice.dtype, chosen, f" ({choice.reason})" if choice.reason else "")
    if requested == "auto" and chosen == "sdpa" and q.is_cuda:
        log.warning(message + "; the padded kernel wastes compute on padding", *args)
    else:
        log.info(message, *args)
    return chosen


def flash_available(q: torch.Tensor) -> bool:
    return unavailable_reason("flash", q, q, q) is None


def torch_varlen_available(q: torch.Tensor) -> bool:
    return unavailable_reason("varlen", q, q, q) is None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                     backend: Backend = "auto") -> torch.Tensor:  # fmt: skip
    """Bidirectional attention within each segment. q, k, v: [T, heads, head_dim] -> [T, heads, head_dim]."""
    backend = resolve_backend(backend, q, k, v)
    s = segments
    if backend == "flash":
        return flash_attn_varlen_func(q, k, v, s.cu_seqlens, s.cu_seqlens, s.max_seqlen, s.max_seqlen, causal=False)
    if backend == "varlen":
        return varlen_attn(q, k, v, s.cu_seqlens, s.cu_seqlens, s.max_seqlen, s.max_seqlen)
    return _padded_attention(q, k, v, segments, _sdpa if backend == "sdpa" else _eager)


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
