"""Sizing work to accelerator memory from a measurement, not by hand."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def activation_bytes_per_token(net: nn.Module, embed: Callable[[list[list[int]]], torch.Tensor], device: torch.device,
                               length: int, texts: int = 4) -> float:  # fmt: skip
    """Peak CUDA memory of one forward + backward of ``embed`` per token, as the slope between ``texts`` and
    ``2 * texts`` texts of ``length`` tokens after a warm-up pass: fixed costs (weights, gradient buffers, kernel
    workspaces) cancel out. Leaves ``net`` without gradients."""
    peaks = []
    for n in (texts, texts, 2 * texts):  # the first pass allocates gradient buffers and workspaces
        token_lists = [[1000 + i % 20000 for i in range(length)]] * n
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        embed(token_lists).float().sum().backward()
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    net.zero_grad(set_to_none=True)
    return max(peaks[2] - peaks[1], 1) / (texts * length)
