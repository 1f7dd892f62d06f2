"""The training data path at scale on generated pairs: rows/s and driver memory as data and workers grow.

    .venv/bin/python -m benchmarks.bench_data_path generate --rows 2000000 --out /tmp/pairs-2m
    .venv/bin/python -m benchmarks.bench_data_path batches --data /tmp/pairs-200k /tmp/pairs-2m --workers 2 [--peer]
    .venv/bin/python -m benchmarks.bench_data_path filter --data /tmp/pairs-200k /tmp/pairs-2m --out /tmp/kept
    .venv/bin/python -m benchmarks.bench_data_path pipeline --data /tmp/pairs-200k /tmp/pairs-2m --out /tmp/kept
    .venv/bin/python -m benchmarks.bench_data_path mine --data /tmp/pairs-200k /tmp/pairs-2m --out /tmp/triplets

``generate`` writes a ``pairs/`` folder: 5 sources of different sizes; queries of 2-12 content words, documents of
12-60 words drawn Zipf-like from the shared Wikipedia sample's vocabulary, starting with half of their query's
words. ``batches`` runs the contrastive stage's data path exactly as training does (`workflows.ingest`: row
index, per-epoch plan, `AssignBatches`, prefixes, one sort, the `EpochFeeder`), with ``--workers`` Ray tasks
standing in for the Train workers, each reading only its own slice; ``--peer`` instead runs the old path: every
worker reads and sorts the whole dataset and keeps its slice. ``filter`` runs the consistency filter
(`ops.pair_data.AssignChunks`, `consistency_filter`) on the pairs, text included, with random embeddings standing
in for the teacher (`PairedRandomEmbed`), and writes the kept pairs as a ``pairs/`` folder (`ops.io`) under
``--out``; ``pipeline`` runs ``filter`` and then ``batches`` over the kept pairs, as the pipeline's stages do;
``mine`` runs hard-negative mining (`ops.mine_negatives.mine`) with a text-hash stand-in teacher (`TextHashEmbed`),
each source split in 8 so that the exact search, quadratic per source, stays seconds, and writes the triplets. Each
``--data`` folder is one run, in the order given, in one Ray session; each prints one JSON line: rows,
seconds, rows/s, the driver's peak RSS during that run (sampled every 20 ms) and the feeder's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                   "RAY_DATA_LOG_LEVEL": "WARNING"}.items():  # fmt: skip
    os.environ.setdefault(key, value)

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mlm_corpus" / "wikipedia_en_sample.txt"
SOURCES = {  # name: (share of rows, query words, document words, prefixes)
    "reddit": (0.35, (3, 12), (12, 60), ("search_query", "search_document")),
    "stackexchange": (0.25, (4, 12), (20, 60), ("clustering", "clustering")),
    "wikipedia": (0.20, (2, 6), (20, 60), ("search_query", "search_document")),
    "s2orc": (0.12, (6, 12), (30, 60), ("search_query", "search_document")),
    "amazon": (0.08, (3, 8), (12, 40), ("classification", "classification")),
}
ROWS_PER_FILE = 50_000
VOCAB = 20_000
EMBEDDING_DIM = 32


def vocabulary(size: int = VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """Words of the shared Wikipedia sample by frequency (or made-up words without it), and Zipf weights."""
    if CORPUS.is_file():
        counts = Counter(re.findall(r"[a-z]+", CORPUS.read_text(encoding="utf-8").lower()))
        words = [w for w, _ in counts.most_common(size)]
    else:
        rng = np.random.default_rng(0)
        words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(size)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    return np.array(words, dtype=object), weights / weights.sum()


def words_of(rng: np.random.Generator, weights: np.ndarray | None, n: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` texts of ``lo..hi`` words drawn Zipf-like (``weights``) or, without, uniformly from the content words
    (ranks 100+): (word indices of all texts, offsets [n + 1])."""
    lengths = rng.integers(lo, hi + 1, n)
    total = int(lengths.sum())
    tokens = rng.choice(len(weights), total, p=weights) if weights is not None else rng.integers(100, VOCAB, total)
    return tokens, np.concatenate([[0], np.cumsum(lengths)])


def with_query_start(query: tuple[np.ndarray, np.ndarray], rest: tuple[np.ndarray, np.ndarray]):
    """Documents that start with the first half of their query's words, then their own."""
    (q, q_off), (d, d_off) = query, rest
    keep = (np.diff(q_off) + 1) // 2
    lengths = keep + np.diff(d_off)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    row = np.repeat(np.arange(len(lengths)), lengths)
    at = np.arange(offsets[-1]) - offsets[row]
    from_query = at < keep[row]
    tokens = np.where(from_query, q[np.minimum(q_off[row] + at, len(q) - 1)],
                      d[np.minimum(d_off[row] + at - keep[row], len(d) - 1)])  # fmt: skip
    return tokens, offsets


def joined(words: pa.Array, tokens: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), words.take(pa.array(tokens))),
                          " ")  # fmt: skip


def generate(rows: int, out: Path, seed: int = 0) -> None:
    """A ``pairs/`` folder: row_id 0..rows-1, sources in contiguous runs (as the ops jobs write them)."""
    rng = np.random.default_rng(seed)
    vocab, weights = vocabulary()
    words = pa.array(vocab.tolist(), pa.string())
    out.mkdir(parents=True, exist_ok=True)
    sizes = {s: int(rows * share) for s, (share, *_) in SOURCES.items()}
    sizes["reddit"] += rows - sum(sizes.values())
    row_id, part = 0, 0
    for source, (_, (qlo, qhi), (dlo, dhi), (qp, dp)) in SOURCES.items():
        for start in range(0, sizes[source], ROWS_PER_FILE):
            n = min(ROWS_PER_FILE, sizes[source] - start)
            query = words_of(rng, None, n, qlo, qhi)
            document = with_query_start(query, words_of(rng, weights, n, dlo, dhi))
            table = pa.table({"row_id": pa.array(np.arange(row_id, row_id + n), pa.int64()),
                              "source": pa.array([source] * n, pa.string()), "query": joined(words, *query),
                              "document": joined(words, *document),
                              "query_prefix": pa.array([qp] * n, pa.string()),
                              "document_prefix": pa.array([dp] * n, pa.string())})  # fmt: skip
            pq.write_table(table, out / f"part-{part:05d}.parquet")
            row_id, part = row_id + n, part + 1
    (out / "manifest.json").write_text(json.dumps({"kind": "pairs", "rows_out": rows, "rows_per_source": sizes,
                                                   "made_by": "benchmarks/bench_data_path"}))  # fmt: skip


class PeakRSS:
    """The driver's peak resident memory (MB) while the block runs, sampled every 20 ms: unlike ``ru_maxrss`` it is
    this run's own when several runs share one process."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self.mb, self._stop, process = 0.0, threading.Event(), psutil.Process()

        def sample() -> None:
            while True:
                self.mb = max(self.mb, process.memory_info().rss / 2**20)
                if self._stop.wait(0.02):
                    return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_ray(object_store_mb: int) -> None:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=object_store_mb * 2**20,
             log_to_driver=False, logging_level="WARNING")  # fmt: skip
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def consume(feeder: str | None, files: list[str], schedule, global_batch: int, rank: int, world: int,
            rows: int) -> dict:  # fmt: skip
    """A stand-in for one Train worker: iterate its batches, mark the row ids it got, note each batch's source."""
    from workflows import ingest

    seen = np.zeros(rows, dtype=bool)
    repeated, sources = 0, []
    if feeder is not None:
        batches = ingest.worker_batches(feeder, schedule, global_batch, rank, world, 0)
    else:  # the peer: this worker reads and sorts everything, keeps its slice of each global batch
        import ray

        from ops.pairs import AddPrefixes, single_source_batches

        ds = single_source_batches(ray.data.read_parquet(files), global_batch, seed=0).map_batches(AddPrefixes())
        n = global_batch // world
        batches = ({k: v[rank * n : (rank + 1) * n] for k, v in b.items()}
                   for b in ds.iter_batches(batch_size=global_batch, batch_format="numpy", drop_last=True))  # fmt: skip
    for batch in batches:
        ids = batch["row_id"]
        repeated += int(seen[ids].sum())
        seen[ids] = True
        names = set(batch["source"].tolist())
        sources.append(names.pop() if len(names) == 1 else None)
    return {"seen": np.packbits(seen), "repeated": repeated, "sources": sources}


def run_batches(data: Path, workers: int, global_batch: int, peer: bool) -> dict:
    import ray

    from ops.io import list_files
    from workflows import contrastive, ingest

    started = time.perf_counter()
    files = list_files(str(data / "part-*.parquet"))
    columns = ["row_id", "source", "query", "document", "query_prefix", "document_prefix"]
    index = ingest.index_parquet(files, "source", {})
    rows = sum(index.counts.values())
    epochs = contrastive.PrefixedPairs(files, columns, index, global_batch, 0, True, None, {}, [])
    schedule = ingest.Schedule.of(epochs.batches_per_epoch, 1, 0, "no full batch")
    name = f"bench-feeder-{data.name}"
    feeder = None if peer else ingest.start_feeder(epochs, workers, schedule.epochs, name, {})
    task = ray.remote(num_cpus=0.25)(consume)
    results = ray.get([task.remote(None if peer else name, files, schedule, global_batch, r, workers, rows)
                       for r in range(workers)])  # fmt: skip
    seconds = time.perf_counter() - started
    seen = np.zeros(rows, dtype=np.int64)
    for r in results:
        seen += np.unpackbits(r["seen"])[:rows]
    per_batch = list(zip(*(r["sources"] for r in results), strict=True))
    single = all(len(set(b)) == 1 and b[0] is not None for b in per_batch)
    feeder_rss = ray.get(feeder.stats.remote())["peak_rss_mb"] if feeder is not None else None
    if feeder is not None:
        ray.kill(feeder)
    trained = schedule.total_steps * global_batch
    return {"path": "peer: every worker reads all" if peer else "sharded", "rows": rows, "workers": workers,
            "global_batch": global_batch, "batches": len(per_batch), "rows_trained": trained,
            "seconds": round(seconds, 2), "rows_per_s": round(trained / seconds), "single_source_batches": single,
            "rows_once": bool(seen.max() == 1 and seen.sum() == trained and sum(r["repeated"] for r in results) == 0),
            "feeder_peak_rss_mb": feeder_rss}  # fmt: skip


class PairedRandomEmbed:
    """``map_batches``: a stand-in teacher without a model. Each pair gets a random direction z (seeded by its row
    id); query and document are z plus independent noise of scale ``noise``, L2-normalised, fp16: a pair agrees more
    than two strangers do, so about 3 in 4 pairs keep their document in the top 2 of a 5,000-pair chunk."""

    def __init__(self, dim: int = EMBEDDING_DIM, noise: float = 0.75):
        self.dim, self.noise = dim, noise

    def gaussian(self, ids: np.ndarray, stream: int) -> np.ndarray:
        from ops.order import mix64

        cells = ids.astype(np.uint64)[:, None] * np.uint64(6 * self.dim) + np.uint64(stream * 2 * self.dim)
        bits = mix64(cells + np.arange(2 * self.dim, dtype=np.uint64))
        uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
        u1, u2 = uniform[:, : self.dim], uniform[:, self.dim :]
        return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)  # Box-Muller

    def embed(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = self.gaussian(ids, 0)
        out = []
        for stream in (1, 2):
            v = z + self.noise * self.gaussian(ids, stream)
            out.append((v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16))
        return out[0], out[1]

    def __call__(self, batch: pa.Table) -> pa.Table:
        query, document = self.embed(batch.column("row_id").to_numpy())
        batch = batch.append_column("key", batch.column("row_id"))
        batch = batch.append_column("query_emb", pa.FixedSizeListArray.from_arrays(query.ravel(), self.dim))
        return batch.append_column("document_emb", pa.FixedSizeListArray.from_arrays(document.ravel(), self.dim))


def run_filter(data: Path, out: Path, chunk_size: int) -> dict:
    """The consistency filter as `ops.pair_data` runs it, the stand-in teacher aside: index pass, chunk map, one
    shuffle, search actors; the kept pairs (with their ``key``) written as a ``pairs/`` folder by `ops.io`."""
    import ray

    from ops import io
    from ops.order import row_index
    from ops.pair_data import PAIR_COLUMNS, AssignChunks, KeptPairs, consistency_filter

    started = time.perf_counter()
    files = io.list_files(str(data / "part-*.parquet"))
    pairs = ray.data.read_parquet(files).select_columns(["row_id", *PAIR_COLUMNS])
    index = row_index(pairs)
    chunks = AssignChunks(index, chunk_size)
    embedded = pairs.map_batches(PairedRandomEmbed(), batch_format="pyarrow", num_cpus=0.5)
    searched = consistency_filter(embedded.map_batches(chunks, batch_format="pyarrow", num_cpus=0.5),
                                  chunks.num_chunks, top_k=2)  # fmt: skip
    io.prepare_output(str(out), overwrite=True)
    io.write_parts(searched.map_batches(KeptPairs(["key", *PAIR_COLUMNS]), batch_format="pyarrow"), str(out),
                   "filter", len(files))
    kept = io.finalize(str(out))
    seconds = time.perf_counter() - started
    rows = sum(index.counts.values())
    return {"rows": rows, "dropped": rows - kept, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds)}


SPLIT_SOURCES = 8  # mining: each generated source split in 8 (by row id), so the exact per-source search stays small


class TextHashEmbed:
    """``map_batches``: a stand-in teacher for mining without a model: each text's embedding is a random direction
    seeded by a hash of the text (the same text, the same vector), L2-normalised, fp16, as ``<column>_emb``."""

    def __init__(self, columns: list[str], dim: int = EMBEDDING_DIM):
        self.columns, self.random = columns, PairedRandomEmbed(dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ops.mine_negatives import text_hash

        for column in self.columns:
            v = self.random.gaussian(text_hash([str(t) for t in batch[column]]), 0)
            batch[f"{column}_emb"] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
        return batch


def as_mining_rows(batch: pa.Table) -> pa.Table:
    """Generated pairs -> the rows `ops.mine_negatives.mine` reads (``key``, ``file``, ``line``), each source split in
    `SPLIT_SOURCES` by row id."""
    ids = batch.column("row_id").to_numpy()
    parts = pc.binary_join_element_wise(batch.column("source"), pa.array((ids % SPLIT_SOURCES).astype(str)), "-")
    batch = batch.set_column(batch.schema.get_field_index("source"), "source", parts)
    return batch.append_column("key", batch.column("row_id")).append_column(
        "file", pa.array(["generated"] * len(ids))).append_column("line", batch.column("row_id"))  # fmt: skip


def run_mine(data: Path, out: Path, chunk_size: int) -> dict:
    """Hard-negative mining as `ops.mine_negatives` runs it, `TextHashEmbed` standing in for the teacher: 7 of the top
    20 negatives per pair, the triplets written as a ``triplets/`` folder under ``--out``."""
    import ray

    from ops import io
    from ops.mine_negatives import MineNegativesConfig, mine, write_mined

    started = time.perf_counter()
    files = io.list_files(str(data / "part-*.parquet"))
    config = MineNegativesConfig(sources=[], output=str(out), chunk_size=chunk_size, num_cpus=0.5,
                                 search_partitions=4)  # 2 CPUs: few shuffle aggregators

    def embed(ds, columns):
        return ds.map_batches(TextHashEmbed, fn_constructor_args=(columns,), batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)  # fmt: skip

    pairs = ray.data.read_parquet(files).map_batches(as_mining_rows, batch_format="pyarrow", num_cpus=0.5)
    io.prepare_output(str(out), overwrite=True)
    rows_out, counts = write_mined(mine(pairs, config, embed), str(out), config.least_negatives, len(files))
    seconds = time.perf_counter() - started
    rows = rows_out + sum(counts.quarantined.values())
    return {"rows": rows, "rows_out": rows_out, "sources": len(counts.topped_up),
            "negatives_per_row": counts.negatives_per_row, "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--rows", type=int, required=True)
    gen.add_argument("--out", type=Path, required=True)
    batches = sub.add_parser("batches")
    batches.add_argument("--peer", action="store_true")
    filtering, pipeline, mining = sub.add_parser("filter"), sub.add_parser("pipeline"), sub.add_parser("mine")
    for p in (filtering, pipeline, mining):
        p.add_argument("--out", type=Path, required=True, help="kept pairs go to <out>/<data folder name>")
        p.add_argument("--chunk-size", type=int, default=5000)
    for p in (batches, filtering, pipeline, mining):
        p.add_argument("--data", type=Path, nargs="+", required=True)
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--global-batch", type=int, default=1024)
        p.add_argument("--object-store-mb", type=int, default=1536)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.rows, args.out)
        return
    start_ray(args.object_store_mb)
    for data in args.data:
        runs = {"filter": lambda: run_filter(data, args.out / data.name, args.chunk_size),
                "mine": lambda: run_mine(data, args.out / data.name, args.chunk_size),
                "batches": lambda: run_batches(args.out / data.name if args.command == "pipeline" else data,
                                               args.workers, args.global_batch, args.command == "batches" and args.peer)}
        for name in ("filter", "batches") if args.command == "pipeline" else (args.command,):
            with PeakRSS() as rss:
                result = runs[name]()
            print(json.dumps({"run": name, **result, "driver_peak_rss_mb": round(rss.mb, 1)}), flush=True)


if __name__ == "__main__":
    main()
