"""AdamW with decoupled weight decay groups, the warm-up/decay schedule, and the optimizer step every trainer shares
(clipping, skipping non-finite steps without a host sync)."""

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
    """Fused AdamW (CPU and CUDA): one kernel per step, and it can skip a step on the device (``found_inf``)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=True)  # fmt: skip


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


class NonFiniteStepsError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm, or the weights stopped being finite.
    The same weights and data would fail again, so Ray Train does not retry it (see `workflows.launch.fit`)."""


class OptimizerStep:
    """What every trainer does after its backward: clip, skip a non-finite step, AdamW, schedule.

    Nothing here reads a value back from the device: the gradient norm and the decision to skip stay on the device
    (fused AdamW skips its update when ``found_inf`` is set, as under torch.amp's GradScaler), and the counters of
    skipped steps are read by `check` only when the loop logs or checkpoints. A skipped step still consumes its batch
    and advances the schedule.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, total_steps: int, device: torch.device):
        self.model, self.max_grad_norm, self.max_skipped_in_row = model, cfg.max_grad_norm, cfg.max_skipped_in_row
        self.optimizer = adamw(model, cfg)
        self.scheduler = scheduler(self.optimizer, cfg, total_steps)
        self.skipped = torch.zeros((), device=device)  # non-finite steps so far (this attempt)
        self.in_row = torch.zeros((), device=device)  # non-finite steps in a row, ending at the last step

    def __call__(self, loss: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """``loss``: the global batch's loss (the same on every worker). Returns what to log (device scalars and the
        learning rate the step used)."""
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        if hasattr(norm, "full_tensor"):  # FSDP: the norm over all shards
            norm = norm.full_tensor()
        not_finite = (~(torch.isfinite(norm) & torch.isfinite(loss.detach()))).float()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.found_inf = not_finite  # fused AdamW leaves weights, moments and its step count alone
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += not_finite
        self.in_row = (self.in_row + 1) * not_finite
        return {"grad_norm": norm.detach(), "lr": lr, "skipped_steps": self.skipped}

    def check(self, step: int) -> None:
        """A host read (at logged and checkpoint steps only): stop once ``max_skipped_in_row`` steps in a row were
        skipped."""
        in_row = int(self.in_row)
        if in_row >= self.max_skipped_in_row:
            raise NonFiniteStepsError(
                f"steps {step - in_row + 1}..{step}: {in_row} optimizer steps in a row had a non-finite loss or "
                f"gradient norm and were skipped (optim.max_skipped_in_row={self.max_skipped_in_row}); the last "
                "checkpoint is kept. Lower optim.lr, check the data, or use fp32."
            )

    def check_weights(self, step: int) -> None:
        """Before a checkpoint: a finite gradient can still carry the weights past the float range (an absurd LR)."""
        local = (p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters())
        if not all(torch.isfinite(p).all() for p in local):
            raise NonFiniteStepsError(
                f"the weights are not finite at step {step}; no checkpoint is written (the last one is kept). Lower "
                "optim.lr or set optim.max_grad_norm."
            )
