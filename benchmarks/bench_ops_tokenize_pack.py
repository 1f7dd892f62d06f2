"""Tokenize + pack throughput: the ops Ray Data pipeline beside ``datasets.map`` with the same fast tokenizer.

    .venv/bin/python -m benchmarks.bench_ops_tokenize_pack [--repeats 2] [--json out.json]

Input: the real sample corpus (Wikipedia articles, the 7 books split into paragraphs, WikiText-2 lines), held in
memory so the numbers measure tokenize + pack, not disk.
Rates are input tokens (with [CLS]/[SEP]) per wall second and per CPU-second (this process and its children,
which include the local Ray's workers), the latter being what to compare on a machine shared with other jobs.
Rows compared:
- ``datasets.map`` reference style: ``tokenizer(texts, return_special_tokens_mask=True)`` then the reference's
  Python concatenate-and-cut (``group_texts``), batch 1000, one process, then ``num_proc=2``;
- ``datasets.map`` with the ops operators (`Tokenize`, `Pack`) on Arrow batches, one process;
- Ray Data ``map_batches(Tokenize) -> map_batches(Pack)`` as tasks, with 1 and 2 concurrent workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                   "RAY_DATA_LOG_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
                   "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}.items():  # fmt: skip
    os.environ.setdefault(key, value)

import pyarrow as pa

from ops.pack import Pack
from ops.tokenize import Tokenize, backend_tokenizer

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mlm_corpus"
ROW, BATCH = 2048, 1000


def cpu_seconds() -> tuple[float, float]:
    """CPU time so far of (this process and all its descendants, i.e. with the local Ray's gcs, raylet and
    workers; the Ray worker processes alone, the ones that run the operators)."""
    import psutil

    total = workers = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = proc.cpu_times()
            used = t.user + t.system + t.children_user + t.children_system
            total += used
            workers += used if proc.name().startswith("ray::") else 0.0
        except psutil.NoSuchProcess:
            continue
    return total, workers


def load_texts() -> list[str]:
    wiki = (CORPUS / "wikipedia_en_sample.txt").read_text(encoding="utf-8")
    texts = [b for b in wiki.split("\n\n") if b.strip()]
    for book in sorted((CORPUS / "gutenberg").glob("*.txt")):
        texts += [p for p in book.read_text(encoding="utf-8", errors="replace").split("\n\n") if p.strip()]
    texts += [line for line in (CORPUS / "wikitext2_raw" / "wiki.test.raw").read_text().splitlines() if line.strip()]
    return texts


def count_tokens(texts: list[str]) -> int:
    return sum(len(e.ids) for e in backend_tokenizer(None).encode_batch(texts))


def bench_datasets_reference(texts: list[str], num_proc: int | None) -> float:
    import datasets

    from nomicbert.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()

    def tokenize_and_group(batch):  # the reference: tokenize with specials, concatenate, cut, drop the remainder
        enc = tokenizer(batch["text"], return_special_tokens_mask=True, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)  # fmt: skip
        out = {}
        for k in ("input_ids", "special_tokens_mask"):
            flat = [t for ids in enc[k] for t in ids]
            total = len(flat) // ROW * ROW
            out[k] = [flat[i:i + ROW] for i in range(0, total, ROW)]
        return out

    ds = datasets.Dataset.from_dict({"text": texts})
    start = time.perf_counter()
    ds.map(tokenize_and_group, batched=True, batch_size=BATCH, remove_columns=["text"], num_proc=num_proc,
           keep_in_memory=True, load_from_cache_file=False)  # fmt: skip
    return time.perf_counter() - start


def bench_datasets_ops(texts: list[str]) -> float:
    import datasets

    tokenize, pack = Tokenize(), Pack(ROW)
    ds = datasets.Dataset.from_dict({"text": texts}).with_format("arrow")
    start = time.perf_counter()
    ds.map(lambda batch: pack(tokenize(batch)), batched=True, batch_size=BATCH, remove_columns=["text"],
           keep_in_memory=True, load_from_cache_file=False)  # fmt: skip
    return time.perf_counter() - start


def bench_ray(texts: list[str], workers: int) -> tuple[float, int]:
    import ray

    ds = ray.data.from_arrow(pa.table({"text": texts})).repartition(max(8, len(texts) // BATCH)).materialize()
    start = time.perf_counter()
    compute = ray.data.TaskPoolStrategy(size=workers)
    packed = ds.map_batches(Tokenize(), batch_size=BATCH, batch_format="pyarrow", num_cpus=1, compute=compute)
    packed = packed.map_batches(Pack(ROW), batch_size=BATCH, batch_format="pyarrow", num_cpus=1, compute=compute)
    rows = sum(b.num_rows for b in packed.iter_batches(batch_size=None, batch_format="pyarrow"))
    return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="best of N per configuration")
    parser.add_argument("--replicate", type=int, default=2, help="repeat the corpus N times (amortise start-up)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import datasets
    import ray

    datasets.disable_progress_bars()
    texts = load_texts() * args.replicate
    tokens = count_tokens(texts)
    print(f"{len(texts)} documents, {tokens} tokens; load average {os.getloadavg()}")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=512 * 2**20,
             log_to_driver=False, logging_level="WARNING")  # fmt: skip
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    results: dict[str, float] = {}
    per_cpu_second: dict[str, float] = {}
    per_worker_cpu_second: dict[str, float] = {}

    def best(name: str, fn) -> None:
        times, cpu, worker_cpu = [], [], []
        for _ in range(args.repeats):
            before = cpu_seconds()
            times.append(fn())
            after = cpu_seconds()
            cpu.append(after[0] - before[0])
            worker_cpu.append(after[1] - before[1])
        results[name] = tokens / min(times)
        per_cpu_second[name] = tokens / min(cpu)
        if name.startswith("ray"):
            per_worker_cpu_second[name] = tokens / min(worker_cpu)
        print(f"{name:40s} {results[name] / 1e6:6.3f} M tokens/s wall, {per_cpu_second[name] / 1e6:6.3f} M tokens "
              f"per CPU-second (wall {[round(t, 2) for t in times]} s, CPU {[round(c, 2) for c in cpu]} s, "
              f"Ray workers' CPU {[round(c, 2) for c in worker_cpu]} s)")

    bench_ray(texts[:2000], 1)  # warm the worker processes and their tokenizer cache
    best("ray_data_ops_1_worker", lambda: bench_ray(texts, 1)[0])
    best("ray_data_ops_2_workers", lambda: bench_ray(texts, 2)[0])
    best("datasets_map_ops_operators_1_proc", lambda: bench_datasets_ops(texts))
    best("datasets_map_reference_1_proc", lambda: bench_datasets_reference(texts, None))
    best("datasets_map_reference_2_proc", lambda: bench_datasets_reference(texts, 2))
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_average_end": os.getloadavg(), "documents": len(texts), "tokens": tokens,
              "tokens_per_s": results, "tokens_per_cpu_second": per_cpu_second,
              "tokens_per_ray_worker_cpu_second": per_worker_cpu_second}  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
