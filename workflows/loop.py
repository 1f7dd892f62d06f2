"""The loop every trainer shares. A stage builds its model and supplies one function, ``forward_backward(batch,
index) -> StepOutput``; resuming, the optimizer step, progress, the skip of non-finite steps and checkpoints are here.

The step never waits for the device: a stage prepares its inputs on the host (token counts, sequence offsets,
masked positions) before moving them, the loss and metrics stay on the device, and values are read back only at
steps that log (every ``run.log_every``) or checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from workflows.chaos import RowLog, maybe_inject_fault
from workflows.checkpoints import full_state, restore, write_checkpoint
from workflows.optimization import OptimizerStep
from workflows.progress import Progress
from workflows.session import Session


@dataclass
class StepOutput:
    loss: torch.Tensor  # the global batch's loss on the device, the same on every worker (after backward)
    tokens: int  # tokens in the global batch over all workers (a host count)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # more device scalars to log (e.g. accuracy)


def read(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Device scalars -> floats in one transfer (the loop's only read from the device)."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return dict(values)
    stacked = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()
    return {**values, **dict(zip(tensors, stacked))}


def train_steps(stage: str, cfg: Any, model: nn.Module, net: nn.Module,
                save_model: Callable[[Path, dict[str, torch.Tensor]], Any], session: Session,
                batches: Iterable[dict[str, np.ndarray]], total_steps: int,
                forward_backward: Callable[[dict[str, np.ndarray], int], StepOutput], resumed: dict[str, Any] | None,
                mlflow_run: dict[str, str] | None,
                evaluate: Callable[[], dict[str, torch.Tensor]] | None = None) -> dict[str, float]:  # fmt: skip
    """Run ``forward_backward`` + the shared optimizer step over this worker's global-batch slices until
    ``total_steps``. ``cfg`` has ``optim``, ``run`` and ``output_dir``; ``model`` is the unwrapped module (optimizer,
    checkpoints), ``net`` what the stage's forward runs (DDP/FSDP-wrapped), ``save_model(folder, weights)`` writes the
    model folder of a checkpoint from ``model``'s full state dict. ``evaluate()`` (every rank, equally often) scores
    the held-out slice every ``cfg.validation.every`` steps and at the end, outside the step, in eval mode without
    gradients; its device scalars are logged as ``val/<name>``. Returns the last logged metrics."""
    optimizer_step = OptimizerStep(model, cfg.optim, total_steps, session.device)
    step, consumed = restore(resumed, model, optimizer_step.optimizer, optimizer_step.scheduler) if resumed else (0, 0)
    progress = Progress(stage, total_steps, step, session.rank, mlflow_run, cfg.run.log_every)
    progress.layout(model, cfg.run.strategy, session.world_size)
    rows = RowLog(cfg.run.row_log, session.rank)
    metrics: dict[str, float] = {}
    validation: dict[str, float] = {}  # the last held-out scores, reported to Ray Train with each checkpoint
    net.train()
    for index, batch in enumerate(batches):
        if index < consumed:  # resume: these global batches were trained on before the restart
            continue
        if step >= total_steps:
            break
        maybe_inject_fault(cfg.run, session, step + 1, cfg.output_dir)
        out = forward_backward(batch, index)
        step_metrics = optimizer_step(out.loss)
        step, consumed = step + 1, index + 1
        rows.write(step, batch["row_id"])
        progress.count(out.tokens)
        checkpoint_due = step % cfg.run.checkpoint_every == 0 or step == total_steps
        if progress.due(step) or checkpoint_due:
            metrics = progress.log(step, read({"loss": out.loss, **out.metrics, **step_metrics}))
            optimizer_step.check(step)
        if evaluate is not None and (step % cfg.validation.every == 0 or step == total_steps):
            net.eval()
            with torch.no_grad():
                validation = progress.log_validation(step, read(evaluate()))
            net.train()
        if checkpoint_due:
            optimizer_step.check_weights(step)
            weights, optimizer_state = full_state(model, optimizer_step.optimizer)
            state = {"step": step, "batches_consumed": consumed, "loss": metrics["loss"], "weights": weights,
                     "optimizer": optimizer_state, "scheduler": optimizer_step.scheduler.state_dict(),
                     "rng": torch.get_rng_state()}  # fmt: skip
            session.report({**metrics, **validation}, step, lambda folder: write_checkpoint(folder, save_model, state))
    return {"step": step, **metrics, **validation}
