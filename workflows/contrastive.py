"""Stage 2: weakly-supervised contrastive pretraining -> nomic-embed-text-v1-unsupervised (spec §5).

    python -m workflows.contrastive --config workflows/configs/contrastive.yaml [key=value ...]
    ray job submit --working-dir . -- python -m workflows.contrastive --config workflows/configs/contrastive_8gpu.yaml

Query -> document InfoNCE (logit scale 50) against the documents of the whole global batch, gathered from all
workers; each global batch comes from one source (`ops.pairs.AssignBatches`, `workflows.ingest`); prefixes are applied in
the Ray Data pipeline (`ops.pairs.AddPrefixes`). Gradient caching (``grad_cache_chunk`` > 0) makes the global
batch independent of accelerator memory. The fine-tuning stages (`workflows.finetune`, `workflows.matryoshka`)
run this same loop with hard negatives and the Matryoshka loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from nomicbert.attention import Segments
from nomicbert.embed import mean_pool_packed
from nomicbert.losses import ContrastiveLoss, GradCache, check_dims
from nomicbert.model import NomicBertModel
from ops.pairs import AddPrefixes
from workflows import chaos, checkpoints, ingest, launch, optimization
from workflows.progress import Progress
from workflows.session import Session, all_reduce_sum, autocast, no_sync
from workflows.settings import MlflowSettings, OptimConfig, RunSettings


@dataclass
class ContrastiveConfig:
    data: str  # pairs/ folder (or triplets/ with a negatives column for fine-tuning)
    output_dir: str  # final model: our layout + hf/ + st/ + training_state/
    init_checkpoint: str  # masked-LM checkpoint (encoder taken) or an encoder checkpoint
    attn_backend: str  # auto | flash | sdpa | eager
    global_batch: int  # queries per step over all workers (reference: 16384 contrastive, 256 fine-tuning)
    grad_cache_chunk: int  # texts per chunk with gradient caching; 0 = off (one forward for the local batch)
    num_negatives: int  # hard negatives per query (fine-tuning: 7); 0 = in-batch negatives only
    source_weights: dict[str, float] | None  # mixture weights per source (0 leaves one out); None = by size
    logit_scale: float  # fixed, not trained (50 = temperature 0.02)
    query_max_length: int
    document_max_length: int
    matryoshka_dims: list[int]  # empty = plain loss (v1); e.g. [768, 512, 256, 128, 64] for v1.5
    matryoshka_weights: list[float]
    epochs: int  # used when max_steps is 0
    max_steps: int  # > 0: exactly this many steps, epochs cycling (each in its own order); 0 = epochs x an epoch
    optim: OptimConfig
    run: RunSettings
    mlflow: MlflowSettings

    stage: ClassVar[str] = "contrastive"

    def __post_init__(self) -> None:
        workers = max(1, self.run.num_workers)
        if self.global_batch < workers or self.global_batch % workers:
            raise ValueError(f"global_batch {self.global_batch} must be a multiple of the {workers} workers")
        if self.grad_cache_chunk < 0 or self.num_negatives < 0 or self.logit_scale <= 0:
            raise ValueError("grad_cache_chunk and num_negatives must be >= 0, logit_scale > 0")
        if self.epochs < 1 or self.max_steps < 0:
            raise ValueError("epochs must be >= 1 and max_steps >= 0")
        self.validate_stage()

    def validate_stage(self) -> None:
        if self.num_negatives:
            raise ValueError("contrastive pretraining uses in-batch negatives only: set num_negatives: 0 "
                             "(hard negatives belong to workflows.finetune)")  # fmt: skip
        if self.matryoshka_dims:
            raise ValueError("matryoshka_dims belong to workflows.matryoshka; leave them empty here")


class PackedEncoder(nn.Module):
    """Token-id lists -> mean-pooled fp32 embeddings [n, H], packed without padding, behind ``forward`` so DDP
    sees every encoding."""

    def __init__(self, model: NomicBertModel, precision: str):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, token_lists: list[list[int]]) -> torch.Tensor:
        device = self.model.embeddings.word_embeddings.weight.device
        segments = Segments.from_lengths([len(t) for t in token_lists], device=device)
        ids = torch.tensor([i for t in token_lists for i in t], dtype=torch.long, device=device)
        with autocast(self.precision, device):
            hidden = self.model.forward_packed(ids, segments)
        return mean_pool_packed(hidden, segments)


def build_model(cfg: ContrastiveConfig) -> NomicBertModel:
    from nomicbert.checkpoint import load_model

    if not Path(cfg.init_checkpoint).is_dir():
        raise ValueError(f"init_checkpoint {cfg.init_checkpoint} is not a checkpoint folder")
    recipe = "v1.5" if cfg.matryoshka_dims else "v1"
    model = load_model(cfg.init_checkpoint, kind="encoder", rotary_scaling_factor=None, embedding_recipe=recipe)
    model.attn_backend = cfg.attn_backend
    if cfg.matryoshka_dims:
        check_dims(cfg.matryoshka_dims, cfg.matryoshka_weights, model.config.hidden_size)
    return model


def load_tokenizer_for(folder: str):
    from nomicbert.tokenizer import load_tokenizer

    try:
        return load_tokenizer(folder)
    except FileNotFoundError:  # a checkpoint without tokenizer files: the default bert-base-uncased
        return load_tokenizer()


def texts_of(batch: dict[str, np.ndarray], num_negatives: int, seed: int, index: int) -> tuple[list[str], list[str]]:
    """Prefixed queries, and documents laid out query-major as [positive, negative_1..negative_k]; negatives are
    drawn per (seed, row_id, global batch index), so a restart draws the same ones."""
    queries = [str(q) for q in batch["query"]]
    documents: list[str] = []
    for row_id, doc, *negatives in zip(batch["row_id"], batch["document"],
                                       *([batch["negatives"]] if num_negatives else [])):  # fmt: skip
        documents.append(str(doc))
        if num_negatives:
            candidates = list(negatives[0])
            if len(candidates) < num_negatives:
                raise ValueError(f"row {row_id} has {len(candidates)} negatives; num_negatives is {num_negatives} "
                                 "(ops.mine_negatives with min_negatives >= num_negatives never writes such rows)")
            rng = np.random.default_rng([seed, int(row_id), index])
            documents.extend(str(candidates[i]) for i in rng.choice(len(candidates), num_negatives, replace=False))
    return queries, documents


def train(cfg: ContrastiveConfig, batches: Iterable[dict[str, np.ndarray]], session: Session, total_steps: int,
          mlflow_run: dict[str, str] | None = None) -> dict[str, float]:  # fmt: skip
    """The training loop, Ray or not. ``batches``: this worker's slice of each global batch, in order, as numpy
    columns ``row_id``, ``query``, ``document`` (prefixed) and, with hard negatives, ``negatives`` (lists)."""
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    tokenizer = load_tokenizer_for(cfg.init_checkpoint)
    with session.latest_checkpoint() as folder:
        resumed = checkpoints.load_weights(folder, model) if folder is not None else None
    net = session.prepare(PackedEncoder(model, cfg.run.precision), cfg.run.strategy)
    optimizer = optimization.adamw(model, cfg.optim)
    sched = optimization.scheduler(optimizer, cfg.optim, total_steps)
    step, consumed = checkpoints.restore(resumed, model, optimizer, sched) if resumed else (0, 0)
    loss_fn = ContrastiveLoss(cfg.logit_scale, 1 + cfg.num_negatives, cfg.matryoshka_dims or None,
                              cfg.matryoshka_weights or None)  # fmt: skip
    cache = GradCache(cfg.grad_cache_chunk, session.device) if cfg.grad_cache_chunk else None
    progress = Progress(cfg.stage, total_steps, step, session.rank, mlflow_run, cfg.run.log_every)
    progress.layout(model, cfg.run.strategy, session.world_size)
    rows = chaos.RowLog(cfg.run.row_log, session.rank)

    def tokenize(texts: list[str], max_length: int) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False)["input_ids"]

    metrics: dict[str, float] = {}
    net.train()
    for index, batch in enumerate(batches):
        if index < consumed:  # resume: these global batches were trained on before the restart
            continue
        if step >= total_steps:
            break
        chaos.maybe_inject_fault(cfg.run, session, step + 1, Path(cfg.output_dir).parent)
        queries, documents = texts_of(batch, cfg.num_negatives, cfg.run.seed, index)
        q_ids, d_ids = tokenize(queries, cfg.query_max_length), tokenize(documents, cfg.document_max_length)
        if cache is not None:
            loss = cache.step(net, [q_ids, d_ids], loss_fn, no_sync(net))
        else:  # one forward for queries and documents: DDP allows one forward per backward
            pooled = net(q_ids + d_ids)
            loss = loss_fn(pooled[: len(q_ids)], pooled[len(q_ids) :])
            loss.backward()
        norm = optimization.grad_norm(model, cfg.optim.max_grad_norm)
        (loss_value,) = all_reduce_sum([loss.item() / session.world_size], session.device)
        optimization.check_finite(loss_value, step + 1)
        lr = sched.get_last_lr()[0]
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        step, consumed = step + 1, index + 1
        rows.write(step, batch["row_id"])
        tokens = sum(map(len, q_ids)) + sum(map(len, d_ids))
        metrics = progress.step(step, tokens * session.world_size, {"loss": loss_value, "lr": lr, "grad_norm": norm})
        if step % cfg.run.checkpoint_every == 0 or step == total_steps:
            weights, optimizer_state = checkpoints.full_state(model, optimizer)
            state = {"step": step, "batches_consumed": consumed, "loss": loss_value, "weights": weights,
                     "optimizer": optimizer_state, "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
            session.report(metrics, step, lambda f: checkpoints.write_checkpoint(f, model, tokenizer, state))
    return {"step": step, **metrics}


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    import importlib

    from ops.config import from_dict

    cls = getattr(importlib.import_module(loop_config["module"]), loop_config["config_class"])
    cfg = from_dict(cls, loop_config["config"])
    session = Session.from_ray(cfg.run)
    batches = ingest.batches_for_worker(loop_config, cfg.global_batch, session.rank, session.world_size)
    return train(cfg, batches, session, loop_config["total_steps"], loop_config["mlflow"])


class PrefixedPairs(ingest.ParquetEpochs):
    """Pairs in single-source global batches, with their task prefixes applied (`ops.pairs.AddPrefixes`)."""

    def row_map(self, epoch: int) -> AddPrefixes:
        return AddPrefixes()


def build_dataset(cfg: ContrastiveConfig) -> tuple[PrefixedPairs, ingest.Schedule]:
    """Single-source global batches with prefixes, epoch by epoch, and the run's schedule."""
    import ray

    from ops.io import join, list_files

    files = list_files(join(cfg.data, "part-*.parquet"))
    columns = ["row_id", "source", "query", "document", "query_prefix", "document_prefix"]
    if cfg.num_negatives:
        if "negatives" not in ray.data.read_parquet(files[0]).columns():
            raise ValueError(f"num_negatives={cfg.num_negatives} but {cfg.data} has no negatives column")
        columns.append("negatives")
    remote = ingest.data_remote_args(cfg.run.data_resources)
    index = ingest.index_parquet(files, "source", remote)
    epochs = PrefixedPairs(files, columns, index, cfg.global_batch, cfg.run.seed, True, cfg.source_weights, remote)
    schedule = ingest.Schedule.of(epochs.batches_per_epoch, cfg.epochs, cfg.max_steps,
                                  f"no source of {cfg.data} fills one global batch of {cfg.global_batch} "
                                  f"({index.counts})")  # fmt: skip
    return epochs, schedule


def run(config: ContrastiveConfig) -> dict[str, Any]:
    """Train and export; returns {"model": output folder, "checkpoint", "steps", "metrics", "mlflow_run_id"}."""
    ingest.ray_data_setup()
    epochs, schedule = build_dataset(config)
    loop = {"module": type(config).__module__, "config_class": type(config).__name__}
    return launch.fit(config.stage, config, train_loop_per_worker, epochs, schedule, kind="encoder",
                      extra_loop_config=loop)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from ops.config import cli

    result = run(cli(ContrastiveConfig, "Stage 2: unsupervised contrastive pretraining", argv))
    print(f"[contrastive] done: {result['steps']} steps, model in {result['model']}")


if __name__ == "__main__":
    main()
