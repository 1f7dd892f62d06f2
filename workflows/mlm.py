"""Stage 1: masked-LM pretraining of nomic-bert-2048 (spec §4) on packed rows of ``mlm-data/``.

    python -m workflows.mlm --config workflows/configs/mlm.yaml [key=value ...]
    ray job submit --working-dir . -- python -m workflows.mlm --config workflows/configs/mlm_8gpu.yaml

Masking (30%, 80/10/10) runs on the fly in the Ray Data pipeline (`ops.mask.MaskTokens`), seeded by
(seed, epoch, row_id), so a resumed run sees the same masks. The loss covers masked positions only and is the
exact mean over the global batch's masked tokens, however the batch is split over workers and micro-batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nomicbert.attention import Segments
from nomicbert.model import NomicBertForPreTraining
from ops.mask import MaskTokens
from workflows import chaos, checkpoints, ingest, launch, optimization
from workflows.progress import Progress
from workflows.session import Session, all_reduce_sum, autocast, no_sync
from workflows.settings import MlflowSettings, OptimConfig, RunSettings


@dataclass
class MLMConfig:
    data: str  # mlm-data/ folder (part-*.parquet + manifest.json)
    output_dir: str  # final model: our layout + hf/ + training_state/
    model: str  # a preset ("nomic-bert-2048", "tiny") or a masked-LM checkpoint folder to continue from
    model_overrides: dict[str, Any]  # NomicBertConfig fields, e.g. {num_hidden_layers: 2}
    attn_backend: str  # auto | flash | sdpa | eager
    mlm_probability: float
    attend_across_documents: bool  # true = the reference: one attention segment per packed row
    shuffle: bool  # seeded per-epoch row order (a sort on a hash of (seed, epoch, row_id))
    global_batch: int  # rows per optimizer step over all workers (reference: 4096)
    micro_batch: int  # rows per forward per worker; accumulation = global_batch / (workers * micro_batch)
    epochs: int  # used when max_steps is 0
    max_steps: int  # > 0: exactly this many steps, epochs cycling (each in its own order); 0 = epochs x an epoch
    optim: OptimConfig
    run: RunSettings
    mlflow: MlflowSettings

    def __post_init__(self) -> None:
        workers = max(1, self.run.num_workers)
        if self.micro_batch < 1 or self.global_batch % (workers * self.micro_batch):
            raise ValueError(f"global_batch {self.global_batch} must be a multiple of workers ({workers}) x "
                             f"micro_batch ({self.micro_batch})")  # fmt: skip
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1) (got {self.mlm_probability})")
        if self.epochs < 1 or self.max_steps < 0:
            raise ValueError("epochs must be >= 1 and max_steps >= 0")


class PackedMLM(nn.Module):
    """The masked-LM forward behind ``forward`` (so DDP sees it): (sum of token losses, correct, masked count)."""

    def __init__(self, model: NomicBertForPreTraining):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, lengths: list[int], labels: torch.Tensor):
        segments = Segments.from_lengths(lengths, device=ids.device)
        out = self.model.forward_packed(ids, segments, labels)
        return out.loss * out.labels.numel(), (out.logits.argmax(-1) == out.labels).sum()


def build_model(cfg: MLMConfig) -> NomicBertForPreTraining:
    from nomicbert.checkpoint import load_model
    from nomicbert.config import PRESETS, preset

    if cfg.model in PRESETS:
        model = NomicBertForPreTraining(preset(cfg.model).replace(**cfg.model_overrides), attn_backend=cfg.attn_backend)
    elif Path(cfg.model).is_dir():
        model = load_model(cfg.model, kind="mlm", **cfg.model_overrides)
        model.bert.attn_backend = cfg.attn_backend
    else:
        raise ValueError(f"model {cfg.model!r} is neither a preset ({sorted(PRESETS)}) nor a checkpoint folder")
    return model


def _stack(column: np.ndarray) -> np.ndarray:
    return np.stack(list(column)) if column.dtype == object else np.asarray(column)


def train(cfg: MLMConfig, batches: Iterable[dict[str, np.ndarray]], session: Session, total_steps: int,
          mlflow_run: dict[str, str] | None = None) -> dict[str, float]:  # fmt: skip
    """The training loop, Ray or not. ``batches``: this worker's slice of each global batch, in order, as numpy
    columns ``row_id``, ``input_ids`` [rows, L], ``labels`` [rows, L] (-100 = not masked), ``doc_lengths``."""
    from nomicbert.tokenizer import load_tokenizer

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    with session.latest_checkpoint() as folder:
        resumed = checkpoints.load_weights(folder, model) if folder is not None else None
    net = session.prepare(PackedMLM(model), cfg.run.strategy)
    optimizer = optimization.adamw(model, cfg.optim)
    sched = optimization.scheduler(optimizer, cfg.optim, total_steps)
    step, consumed = checkpoints.restore(resumed, model, optimizer, sched) if resumed else (0, 0)
    tokenizer = load_tokenizer()
    progress = Progress("mlm", total_steps, step, session.rank, mlflow_run, cfg.run.log_every)
    progress.layout(model, cfg.run.strategy, session.world_size)
    rows = chaos.RowLog(cfg.run.row_log, session.rank)
    accumulation = cfg.global_batch // (session.world_size * cfg.micro_batch)
    skip_sync = no_sync(net)
    metrics: dict[str, float] = {}
    net.train()
    for index, batch in enumerate(batches):
        if index < consumed:  # resume: these global batches were trained on before the restart
            continue
        if step >= total_steps:
            break
        chaos.maybe_inject_fault(cfg.run, session, step + 1, Path(cfg.output_dir).parent)
        ids = torch.as_tensor(_stack(batch["input_ids"]), dtype=torch.long)
        labels = torch.as_tensor(_stack(batch["labels"]), dtype=torch.long)
        (masked_total,) = all_reduce_sum([float((labels != -100).sum())], session.device)
        loss_sum = correct = 0.0
        for m in range(accumulation):
            part = slice(m * cfg.micro_batch, (m + 1) * cfg.micro_batch)
            if cfg.attend_across_documents:
                lengths = [ids.shape[1]] * ids[part].shape[0]
            else:
                lengths = [int(n) for row in batch["doc_lengths"][part] for n in row]
            sync = m == accumulation - 1 or skip_sync is None
            with (contextlib.nullcontext() if sync else skip_sync()), autocast(cfg.run.precision, session.device):
                part_loss, part_correct = net(ids[part].flatten().to(session.device), lengths,
                                              labels[part].flatten().to(session.device))  # fmt: skip
            # each worker's share of the global mean; DDP averages over workers, hence * world_size
            (part_loss * session.world_size / masked_total).backward()
            loss_sum, correct = loss_sum + part_loss.item(), correct + part_correct.item()
        norm = optimization.grad_norm(model, cfg.optim.max_grad_norm)
        loss_sum, correct = all_reduce_sum([loss_sum, correct], session.device)
        loss = loss_sum / masked_total
        optimization.check_finite(loss, step + 1)
        lr = sched.get_last_lr()[0]
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        step, consumed = step + 1, index + 1
        rows.write(step, batch["row_id"])
        metrics = progress.step(step, ids.numel() * session.world_size,
                                {"loss": loss, "accuracy": correct / masked_total, "lr": lr, "grad_norm": norm})
        if step % cfg.run.checkpoint_every == 0 or step == total_steps:
            weights, optimizer_state = checkpoints.full_state(model, optimizer)
            state = {"step": step, "batches_consumed": consumed, "loss": loss, "weights": weights,
                     "optimizer": optimizer_state, "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
            session.report(metrics, step, lambda f: checkpoints.write_checkpoint(f, model, tokenizer, state))
    return {"step": step, **metrics}


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    from ops.config import from_dict

    cfg = from_dict(MLMConfig, loop_config["config"])
    session = Session.from_ray(cfg.run)
    batches = ingest.batches_for_worker(loop_config, cfg.global_batch, session.rank, session.world_size)
    return train(cfg, batches, session, loop_config["total_steps"], loop_config["mlflow"])


@dataclass
class MaskedRows(ingest.ParquetEpochs):
    """Packed rows, masked afresh each epoch (`ops.mask.MaskTokens`, seeded by (seed, epoch, row_id))."""

    mlm_probability: float

    def row_map(self, epoch: int) -> MaskTokens:
        return MaskTokens(self.mlm_probability, self.seed, epoch)


def build_dataset(cfg: MLMConfig) -> tuple[MaskedRows, ingest.Schedule]:
    """The masked rows epoch by epoch (a seeded order per epoch with ``shuffle``) and the run's schedule."""
    from ops.io import join, list_files

    files = list_files(join(cfg.data, "part-*.parquet"))
    remote = ingest.data_remote_args(cfg.run.data_resources)
    index = ingest.index_parquet(files, None, remote)
    epochs = MaskedRows(files, ["row_id", "input_ids", "doc_lengths", "special_tokens_mask"], index, cfg.global_batch,
                        cfg.run.seed, cfg.shuffle, None, remote, cfg.mlm_probability)  # fmt: skip
    rows = sum(index.counts.values())
    schedule = ingest.Schedule.of(epochs.batches_per_epoch, cfg.epochs, cfg.max_steps,
                                  f"{cfg.data} has {rows} rows, fewer than one global batch ({cfg.global_batch})")
    return epochs, schedule


def run(config: MLMConfig) -> dict[str, Any]:
    """Train and export; returns {"model": output folder, "checkpoint", "steps", "metrics", "mlflow_run_id"}."""
    ingest.ray_data_setup()
    epochs, schedule = build_dataset(config)
    return launch.fit("mlm", config, train_loop_per_worker, epochs, schedule, kind="mlm")


def main(argv: list[str] | None = None) -> None:
    from ops.config import cli

    result = run(cli(MLMConfig, "Stage 1: masked-LM pretraining (nomic-bert-2048)", argv))
    print(f"[mlm] done: {result['steps']} steps, model in {result['model']}")


if __name__ == "__main__":
    main()
