"""Model benchmark: masked-LM training and embedding throughput, ours beside transformers' NomicBert.

    python benchmarks/bench_model.py                      # GPU: nomic-bert-2048 shape, bf16, 8 x 2048 rows
    python benchmarks/bench_model.py --device cpu --tiny  # smoke run on a CPU

Prints one table (ours, peer, ratio, tokens/s, MFU, peak memory) and the numerical check: our bf16 output's
error against the fp32 reference must stay within 3x of the reference's own bf16 error. Needs no Ray.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from collections.abc import Callable

import torch
import transformers

from nomicbert.attention import Segments
from nomicbert.checkpoint import nomic_to_hf
from nomicbert.config import NomicBertConfig, tiny
from nomicbert.embed import mean_pool, mean_pool_packed
from nomicbert.model import NomicBertForPreTraining, NomicBertModel, masked_tokens, mlm_flops_per_token

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 SXM (spec sheet), the MFU denominator


def hf_config(config: NomicBertConfig) -> transformers.NomicBertConfig:
    raw = config.to_hf_dict()  # carries rope_parameters
    raw.pop("model_type"), raw.pop("architectures")
    return transformers.NomicBertConfig(**raw)


def timed(step: Callable[[], None], device: torch.device, warmup: int, iters: int, clock: str = "wall") -> float:
    """Seconds per call; ``clock="cpu"``: this process's CPU seconds, steadier than wall time on a shared CPU."""
    clock_fn = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock_fn()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock_fn() - start) / iters


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def mlm_rows(config: NomicBertConfig, rows: int, seq: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (rows, seq), generator=g)
    masked = torch.rand(rows, seq, generator=g) < 0.3
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    inputs = torch.where(masked, torch.full_like(ids, 103), ids)
    return inputs.to(device), labels.to(device)


def bench_training(config, args, device, dtype) -> list[dict]:
    inputs, labels = mlm_rows(config, args.rows, args.seq, device)
    tokens = inputs.numel()
    flops = mlm_flops_per_token(config, args.seq) * tokens
    segments = Segments.from_lengths([args.seq] * args.rows, device=device)
    flat_inputs, flat_labels = inputs.reshape(-1), labels.reshape(-1)
    mask = torch.ones_like(inputs)
    results = []

    def run(name: str, model: torch.nn.Module, forward: Callable[[], torch.Tensor]):
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = forward()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, device, args.warmup, args.iters, args.clock)
        results.append({"bench": "mlm-train", "impl": name, "tokens_per_s": tokens / seconds,
                        "mfu": flops / seconds / args.peak_flops, "peak_gib": peak_memory_gib(device)})  # fmt: skip
        model.cpu()

    positions, targets = masked_tokens(flat_labels)  # on the host side of a real step; here once
    torch.manual_seed(0)
    ours = NomicBertForPreTraining(config)
    peer = transformers.NomicBertForMaskedLM(hf_config(config))
    compiled_peer = None
    for compile_ in (False, True) if args.compile else (False,):
        suffix = " +compile" if compile_ else ""
        if compile_:
            ours.bert.compile_blocks()  # the trainers' run.compile: each block, dynamic shapes
            compiled_peer = torch.compile(peer)  # transformers' usual way: the whole model
        run_peer = compiled_peer if compiled_peer is not None else peer
        run("transformers NomicBert" + suffix, peer,
            lambda: run_peer(input_ids=inputs, attention_mask=mask, labels=labels).loss)  # fmt: skip
        run("ours" + suffix, ours, lambda: ours.forward_packed(flat_inputs, segments, positions, targets).loss)
    return results


def bench_embedding(config, args, device, dtype) -> list[dict]:
    """Lengths 32..512, sorted into batches of 128, as a user would call it (no labels, inference mode)."""
    g = torch.Generator().manual_seed(1)
    lengths = sorted(torch.randint(32, 513, (args.texts,), generator=g).tolist(), reverse=True)
    batches = [lengths[i : i + 128] for i in range(0, len(lengths), 128)]
    total = sum(lengths)
    torch.manual_seed(0)
    ours = NomicBertModel(config).to(device, dtype).eval()
    peer = transformers.NomicBertModel(hf_config(config)).to(device, dtype).eval()
    peer.load_state_dict(nomic_to_hf(ours.state_dict()))
    padded = []
    for batch in batches:
        ids = torch.randint(1000, 30000, (len(batch), max(batch)), generator=g)
        mask = (torch.arange(max(batch))[None, :] < torch.tensor(batch)[:, None]).long()
        padded.append(((ids * mask).to(device), mask.to(device)))
    packed = [(ids[mask.bool()], Segments.from_lengths(batch, device=device)) for (ids, mask), batch in zip(padded, batches)]

    def peer_pass(model):
        @torch.inference_mode()
        def run():
            for ids, mask in padded:
                mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

        return run

    @torch.inference_mode()
    def run_ours():
        for ids, segments in packed:
            mean_pool_packed(ours.forward_packed(ids, segments), segments)

    results = []

    def measure(name: str, fn: Callable[[], None]) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(fn, device, 1, max(1, args.iters // 2), args.clock)  # the warm-up pass also compiles
        results.append({"bench": "embed 32-512", "impl": name, "tokens_per_s": total / seconds,
                        "mfu": float("nan"), "peak_gib": peak_memory_gib(device)})  # fmt: skip

    measure("transformers NomicBert", peer_pass(peer))
    measure("ours", run_ours)
    if args.compile:
        measure("transformers NomicBert +compile", peer_pass(torch.compile(peer, dynamic=True)))  # varying shapes
        ours.compile_blocks()
        measure("ours +compile", run_ours)
    return results


def numerical_check(config, device) -> dict:
    """bf16 error vs the fp32 reference: ours must stay within 3x of transformers' own bf16 error."""
    if device.type != "cuda":
        return {}
    torch.manual_seed(0)
    ours = NomicBertModel(config).to(device).eval()
    peer = transformers.NomicBertModel(hf_config(config)).to(device).eval()
    peer.load_state_dict(nomic_to_hf(ours.state_dict()))
    lengths = [512, 300, 77, 512]
    ids = torch.randint(1000, 30000, (4, 512), device=device)
    mask = (torch.arange(512, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]).long()
    keep = mask.bool()
    with torch.inference_mode():
        exact = peer(input_ids=ids, attention_mask=mask).last_hidden_state[keep].float()
        peer.to(torch.bfloat16), ours.to(torch.bfloat16)
        peer_err = (peer(input_ids=ids, attention_mask=mask).last_hidden_state[keep].float() - exact).abs().max()
        ours_err = (ours(ids, mask)[keep].float() - exact).abs().max()
    return {"peer_bf16_err": float(peer_err), "ours_bf16_err": float(ours_err),
            "ok": bool(ours_err <= 3 * peer_err)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--texts", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: per CPU-second (CPU runs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = tiny() if args.tiny else NomicBertConfig()
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {datetime.date.today()} on {name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{'tiny' if args.tiny else 'nomic-bert-2048'}, {dtype}")  # fmt: skip
    rows = bench_training(config, args, device, dtype) + bench_embedding(config, args, device, dtype)
    print("| bench | impl | tokens/s | vs peer | MFU | peak GiB |\n|---|---|---|---|---|---|")
    for row in rows:
        peer_name = "transformers NomicBert" + (" +compile" if "compile" in row["impl"] else "")
        peer = next(r for r in rows if r["bench"] == row["bench"] and r["impl"] == peer_name)
        print(f"| {row['bench']} | {row['impl']} | {row['tokens_per_s']:,.0f} | "
              f"{row['tokens_per_s'] / peer['tokens_per_s']:.2f}x | {row['mfu']:.1%} | {row['peak_gib']:.1f} |")  # fmt: skip
    check = numerical_check(config, device)
    if check:
        print(f"numerical check (bf16 max abs err vs fp32): ours {check['ours_bf16_err']:.3g}, "
              f"peer {check['peer_bf16_err']:.3g} -> {'OK' if check['ok'] else 'FAIL'}")  # fmt: skip


if __name__ == "__main__":
    main()
