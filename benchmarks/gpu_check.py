"""The one GPU check (`make gpu-check`): everything the CPU tests cannot prove, in one run of a few minutes, no Ray.

    python benchmarks/gpu_check.py --out gpu-check/        # writes gpu-check/summary.md and one log per part

Parts, each in its own process with its own time limit (a hang or crash in one does not lose the others):
1. environment: the card, torch, transformers, which padding-free kernels exist;
2. `tests/test_gpu.py`: kernel parity of every available backend against the fp32 eager path under bf16 autocast
   (within 3x of the eager kernel's own bf16 error), the kernel `auto` chose, compiled blocks == eager, one step of
   each trainer on CUDA under torch's sync debug mode (no host synchronisation outside the periodic read);
3. `benchmarks/bench_model.py`: masked-LM training and embedding beside transformers' NomicBert, eager and compiled;
4. `benchmarks/bench_contrastive.py`: one step at the 16,384-pair contrastive batch beside sentence-transformers'
   CachedMultipleNegativesRankingLoss (skipped with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file (python benchmarks/gpu_check.py): the packages live one folder up


def environment() -> str:
    import torch

    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}"]
    try:
        import transformers

        lines.append(f"transformers {transformers.__version__} (NomicBert: {hasattr(transformers, 'NomicBertModel')})")
    except ImportError:
        lines.append("transformers: not installed")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        lines.append(f"{torch.cuda.get_device_name()}, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), "
                     f"capability {torch.cuda.get_device_capability()}")  # fmt: skip
    else:
        lines.append("no CUDA device")
    from nomicbert.attention import flash_attn_varlen_func, varlen_attn

    have = {"flash-attn": flash_attn_varlen_func is not None, "torch varlen_attn": varlen_attn is not None}
    lines.append("; ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in have.items()))
    return "\n".join(lines)


def part(name: str, command: list[str], timeout: int, out: Path) -> str:
    """Run one part; its whole output goes to ``out/<name>.log``; returns a summary block."""
    start = time.perf_counter()
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        text, status = done.stdout + done.stderr, f"exit {done.returncode}"
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        text += (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        status = f"timed out after {timeout} s"
    (out / f"{name}.log").write_text(text)
    seconds = time.perf_counter() - start
    print(f"[gpu-check] {name}: {status} in {seconds:.0f} s", flush=True)
    starts = ("|", "#", "numerical", "PASSED", "FAILED", "SKIPPED", "ERROR", "auto under", "mlm:", "contrastive:",
              "finetune:", "matryoshka:", "ours:", "peer:")  # fmt: skip
    keep = [line for line in text.splitlines()
            if line.startswith(starts) or " passed" in line or " failed" in line or "max abs error" in line]
    return f"## {name} ({status}, {seconds:.0f} s)\n\n" + "\n".join(keep[-60:]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--pairs", type=Path, default=None, help="query/document JSON lines for the contrastive bench")
    parser.add_argument("--quick", action="store_true", help="skip the 16,384-pair contrastive benchmark")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks this script itself")
    parser.add_argument("--parts", default="tests,bench_model,bench_contrastive", help="comma-separated parts to run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = ["# gpu-check", "", "```", environment(), "```", ""]
    print(summary[3], flush=True)
    python = sys.executable
    small = ["--device", "cpu", "--tiny"] if args.smoke else []
    model_args = ["--rows", "2", "--seq", "128", "--texts", "64", "--iters", "1", "--warmup", "1", "--no-compile"] \
        if args.smoke else ["--iters", "6", "--texts", "1024"]  # fmt: skip
    pair_args = ["--batch", "32", "--chunk", "8", "--max-length", "64", "--iters", "1", "--warmup", "0"] \
        if args.smoke else ["--iters", "1", "--warmup", "1"]  # fmt: skip
    # time limits sized so the three parts fit one 10-minute command on one GPU
    parts = set(args.parts.split(","))
    if "tests" in parts:
        summary.append(part("tests", [python, "-m", "pytest", "-q", "-rA", "-s", "-p", "no:cacheprovider",
                                      "tests/test_gpu.py"], 170, args.out))  # fmt: skip
    if "bench_model" in parts:
        summary.append(part("bench_model", [python, "benchmarks/bench_model.py", *small, *model_args], 240, args.out))
    if "bench_contrastive" in parts and not args.quick and args.pairs:
        command = [python, "benchmarks/bench_contrastive.py", "--pairs", str(args.pairs), *small, *pair_args]
        summary.append(part("bench_contrastive", command, 240, args.out))
    (args.out / "summary.md").write_text("\n".join(summary))
    print("\n".join(summary))


if __name__ == "__main__":
    main()
