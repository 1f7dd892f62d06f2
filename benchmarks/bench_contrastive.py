"""One contrastive training step at the paper's global batch (16,384 pairs) on one GPU, ours beside
sentence-transformers' cached loss.

    python benchmarks/bench_contrastive.py --pairs pairs.jsonl                    # GPU: nomic-bert-2048, bf16
    python benchmarks/bench_contrastive.py --device cpu --tiny --batch 64 --chunk 16 --pairs pairs.jsonl  # smoke

Both sides embed the same prefixed texts (``{"query", "document"}`` lines, cycled to the batch) with the same weights,
bf16 autocast, the InfoNCE loss at scale 50 over in-batch negatives, gradient caching in chunks of ``--chunk`` texts,
and a fused AdamW step; tokenization is timed on both sides.
- ours: `workflows.contrastive.StreamEncoder` over `NomicEncoder` (queries and documents as separate packed streams) + `GradCache` +
  `ContrastiveLoss`, as the trainer runs them;
- peer: sentence-transformers' `CachedMultipleNegativesRankingLoss` (``mini_batch_size`` = chunk) over transformers'
  `NomicBert` loaded from our `st/` export, padded per column as its data collator does.
Needs no Ray.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file: the packages are one folder up

from benchmarks.bench_model import timed
from nomicbert.checkpoint import export_all
from nomicbert.config import NomicBertConfig, tiny
from nomicbert.encoders import NomicEncoder
from nomicbert.losses import ContrastiveLoss, GradCache
from nomicbert.model import NomicBertModel
from nomicbert.tokenizer import load_tokenizer
from workflows.contrastive import StreamEncoder


def read_pairs(path: Path, batch: int) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.open()]
    rows = list(itertools.islice(itertools.cycle(rows), batch))
    return [f"search_query: {r['query']}" for r in rows], [f"search_document: {r['document']}" for r in rows]


def measure(short: str, impl: str, step, device: torch.device, args) -> tuple[str, float, float]:
    """(impl, seconds per step, peak GiB); printed at once, so a later failure does not lose it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"{short}: {seconds:.2f} s / step, {args.batch / seconds:,.0f} pairs/s", flush=True)
    return impl, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=Path, required=True, help="JSON lines with query and document")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--only", choices=["ours", "peer"], default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = tiny() if args.tiny else NomicBertConfig()
    queries, documents = read_pairs(args.pairs, args.batch)
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = NomicBertModel(config)
    folder = Path(tempfile.mkdtemp(prefix="bench-contrastive-"))
    export_all(model, folder, tokenizer)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    shape = "tiny" if args.tiny else "nomic-bert-2048"
    print(f"# {datetime.date.today()} on {name}, torch {torch.__version__}, {shape}, "
          f"{dtype}, batch {args.batch} pairs, chunk {args.chunk}, max length {args.max_length}")  # fmt: skip
    rows = []

    if args.only in (None, "ours"):
        model.to(device).train()
        net = StreamEncoder(NomicEncoder(model, tokenizer), "bf16" if dtype == torch.bfloat16 else "fp32")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        cache, loss_fn = GradCache(args.chunk, device), ContrastiveLoss(logit_scale=50.0)

        def ours_step() -> None:
            tokenize = lambda texts: tokenizer(texts, truncation=True, max_length=args.max_length,  # noqa: E731
                                               return_attention_mask=False)["input_ids"]  # fmt: skip
            cache.step(lambda token_lists: net([token_lists])[0], [tokenize(queries), tokenize(documents)], loss_fn)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        rows.append(measure("ours", "ours (packed streams + GradCache)", ours_step, device, args))
        model.cpu()

    if args.only in (None, "peer"):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

        peer = SentenceTransformer(str(folder / "st"), device=str(device))
        peer.max_seq_length = args.max_length
        peer.train()
        optimizer = torch.optim.AdamW(peer.parameters(), lr=1e-5, fused=True)
        loss_fn = CachedMultipleNegativesRankingLoss(peer, scale=50.0, mini_batch_size=args.chunk)

        def peer_step() -> None:
            features = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                        for batch in (peer.tokenize(queries), peer.tokenize(documents))]  # fmt: skip
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = loss_fn(features, labels=None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        rows.append(measure("peer", "sentence-transformers CachedMNRL over transformers NomicBert", peer_step, device,
                            args))  # fmt: skip

    peer_seconds = rows[-1][1]
    print("| impl | s / step | pairs/s | vs peer | peak GiB |\n|---|---|---|---|---|")
    for impl, seconds, peak in rows:
        print(f"| {impl} | {seconds:.2f} | {args.batch / seconds:,.0f} | {peer_seconds / seconds:.2f}x | {peak:.1f} |")


if __name__ == "__main__":
    main()
