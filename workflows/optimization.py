"""AdamW with decoupled weight decay groups, the warm-up/decay schedule, and the guard against non-finite steps."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from workflows.settings import OptimConfig

log = logging.getLogger("workflows.train")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on >= 2-D weights (linear layers and embeddings), none on biases and LayerNorms.
    Tied parameters appear once (``named_parameters`` de-duplicates them)."""
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    log.info("optimizer: %d tensors with weight decay, %d without", len(decay), len(no_decay))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear or cosine decay to 0 at ``total_steps``."""
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; no checkpoint is written for the step, the last good one stays."""


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; stopping without writing a checkpoint (the last good one is kept). "
            "Lower optim.lr, check the data, or use fp32."
        )


def grad_norm(model: nn.Module, max_norm: float) -> float:
    """Total gradient norm, clipping to ``max_norm`` when it is > 0 (over all shards under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
