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
from workflows import checkpoints, ingest, launch
from workflows.loop import StepOutput, train_steps
from workflows.session import Session, all_reduce_sum, autocast, no_sync
from workflows.settings import MlflowSettings, OptimConfig, RunSettings, ValidationSettings


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
    validation: ValidationSettings  # held-out packed rows: masked-LM loss and accuracy on a fixed masking
    optim: OptimConfig
    run: RunSettings
    mlflow: MlflowSettings

    def __post_init__(self) -> None:
        workers = max(1, self.run.num_workers)
        self.validation.check_workers(workers)
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

    def forward(self, ids: torch.Tensor, segments: Segments, positions: torch.Tensor, targets: torch.Tensor):
        out = self.model.forward_packed(ids, segments, positions, targets)
        return out.loss * targets.numel(), (out.logits.argmax(-1) == targets).sum()


def build_model(cfg: MLMConfig) -> NomicBertForPreTraining:
    from nomicbert.checkpoint import load_model
    from nomicbert.config import PRESETS, preset
    from ops.io import is_remote, local_copy

    if cfg.model in PRESETS:
        model = NomicBertForPreTraining(preset(cfg.model).replace(**cfg.model_overrides), attn_backend=cfg.attn_backend)
    elif is_remote(cfg.model) or Path(cfg.model).is_dir():
        model = load_model(local_copy(cfg.model), kind="mlm", **cfg.model_overrides)
        model.bert.attn_backend = cfg.attn_backend
    else:
        raise ValueError(f"model {cfg.model!r} is neither a preset ({sorted(PRESETS)}) nor a checkpoint folder")
    return model


def _stack(column: np.ndarray) -> np.ndarray:
    """A writable [rows, L] array (Ray's batches are read-only, which torch warns about when it wraps them)."""
    return np.stack(list(column)) if column.dtype == object else np.array(column)


def train(cfg: MLMConfig, batches: Iterable[dict[str, np.ndarray]], session: Session, total_steps: int,
          mlflow_run: dict[str, str] | None = None,
          validation_rows: dict[str, np.ndarray] | None = None) -> dict[str, float]:  # fmt: skip
    """The training loop, Ray or not. ``batches``: this worker's slice of each global batch, in order, as numpy
    columns ``row_id``, ``input_ids`` [rows, L], ``labels`` [rows, L] (-100 = not masked), ``doc_lengths``.
    ``validation_rows``: the held-out rows in the same columns (all of them; each worker scores its share)."""
    from nomicbert.checkpoint import save_pretrained
    from nomicbert.tokenizer import load_tokenizer

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    with session.latest_checkpoint() as folder:
        resumed = checkpoints.load_weights(folder, model) if folder is not None else None
    if cfg.run.compile:
        model.bert.compile_blocks()
    net = session.prepare(PackedMLM(model), cfg.run.strategy)
    accumulation = cfg.global_batch // (session.world_size * cfg.micro_batch)
    skip_sync = no_sync(net)

    def micro_batch(ids: np.ndarray, labels: np.ndarray, doc_lengths: np.ndarray, part: slice):
        """A micro-batch's device inputs: packed ids, segments, masked positions and their labels."""
        if cfg.attend_across_documents:
            lengths = [ids.shape[1]] * ids[part].shape[0]
        else:
            lengths = [int(n) for row in doc_lengths[part] for n in row]
        flat_labels = labels[part].reshape(-1)
        positions = np.flatnonzero(flat_labels != -100)  # found on the host: the device never reports M
        inputs = [session.to_device(torch.from_numpy(x)) for x in (ids[part].reshape(-1), positions,
                                                                   flat_labels[positions])]  # fmt: skip
        return inputs[0], Segments.from_lengths(lengths, device=session.device), inputs[1], inputs[2]

    def forward_backward(batch: dict[str, np.ndarray], index: int) -> StepOutput:
        ids, labels = _stack(batch["input_ids"]).astype(np.int64), _stack(batch["labels"]).astype(np.int64)
        # the exact global mean over masked tokens: every worker needs the global count (summed on the device)
        masked_total = all_reduce_sum(session.to_device(torch.tensor(float((labels != -100).sum()))))
        loss_sum = correct = torch.zeros((), device=session.device)
        for m in range(accumulation):
            part = slice(m * cfg.micro_batch, (m + 1) * cfg.micro_batch)
            inputs = micro_batch(ids, labels, batch["doc_lengths"], part)
            sync = m == accumulation - 1 or skip_sync is None
            with (contextlib.nullcontext() if sync else skip_sync()), autocast(cfg.run.precision, session.device):
                part_loss, part_correct = net(*inputs)
            # each worker's share of the global mean; DDP averages over workers, hence * world_size
            (part_loss * session.world_size / masked_total).backward()
            loss_sum, correct = loss_sum + part_loss.detach(), correct + part_correct
        loss_sum, correct = all_reduce_sum(torch.stack([loss_sum, correct.float()]))
        return StepOutput(loss_sum / masked_total, ids.size * session.world_size, {"accuracy": correct / masked_total})

    held = ingest.validation_share(validation_rows, session.rank, session.world_size) if validation_rows else None

    def evaluate() -> dict[str, torch.Tensor]:
        """Masked-LM loss and accuracy over all held-out masked tokens (each worker its share, summed)."""
        ids, labels = _stack(held["input_ids"]).astype(np.int64), _stack(held["labels"]).astype(np.int64)
        totals = session.to_device(torch.tensor([0.0, 0.0, float((labels != -100).sum())]))  # loss, correct, masked
        for start in range(0, len(ids), cfg.micro_batch):
            inputs = micro_batch(ids, labels, held["doc_lengths"], slice(start, start + cfg.micro_batch))
            with autocast(cfg.run.precision, session.device):
                part_loss, part_correct = net(*inputs)
            totals[:2] += torch.stack([part_loss.float(), part_correct.float()])
        loss_sum, correct, masked = all_reduce_sum(totals)
        return {"mlm_loss": loss_sum / masked, "mlm_accuracy": correct / masked}

    tokenizer = load_tokenizer()

    def save_model(folder: Path, weights: dict[str, torch.Tensor]) -> None:
        save_pretrained(model, folder, tokenizer, weights=weights)

    return train_steps("mlm", cfg, model, net, save_model, session, batches, total_steps, forward_backward, resumed,
                       mlflow_run, evaluate if held else None)  # fmt: skip


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    from ops.config import from_dict

    cfg = from_dict(MLMConfig, loop_config["config"])
    session = Session.from_ray(cfg.run)
    batches = ingest.batches_for_worker(loop_config, cfg.global_batch, session.rank, session.world_size)
    return train(cfg, batches, session, loop_config["total_steps"], loop_config["mlflow"],
                 ingest.validation_rows(loop_config))  # fmt: skip


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
    held_out, index = ingest.hold_out(ingest.index_parquet(files, None, remote), cfg.validation.rows)
    epochs = MaskedRows(files, ["row_id", "input_ids", "doc_lengths", "special_tokens_mask"], index, cfg.global_batch,
                        cfg.run.seed, cfg.shuffle, None, remote, held_out, cfg.mlm_probability)  # fmt: skip
    rows = sum(index.counts.values())
    schedule = ingest.Schedule.of(epochs.batches_per_epoch, cfg.epochs, cfg.max_steps,
                                  f"{cfg.data} has {rows} rows for training ({cfg.validation.rows} more held out for "
                                  f"validation), fewer than one global batch ({cfg.global_batch})")  # fmt: skip
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
