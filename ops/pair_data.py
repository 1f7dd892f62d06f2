"""Pair data job: read sources -> (query, document) + prefix names -> consistency filter -> ``pairs/`` (spec §5, §6).

    python -m ops.pair_data --config workflows/configs/pair_data.yaml [key=value ...]
    ray job submit --working-dir . -- python -m ops.pair_data --config workflows/configs/pair_data.yaml

The teacher embeds queries and documents in an actor pool; the embeddings (not the text) are materialised
(Ray spills them to disk when they outgrow the object store); each source is cut into consecutive chunks of at
most ``chunk_size`` pairs, searched exactly (a Ray task, on a GPU when ``teacher.num_gpus`` > 0); a pair is kept
iff its own document is in its query's top ``top_k``. The sources are then read again (cheap next to
embedding), the kept pairs written, and every dropped pair counted under ``consistency_filter``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ops import io
from ops.config import cli, fingerprint, to_dict
from ops.jobs import data_context, ensure_ray, log, setup_logging
from ops.pairs import AttachPrefixNames
from ops.readers import FilePlan, SourceConfig, preflight, read_sources
from ops.teacher import TeacherConfig, consistency_mask, embed_dataset, remote

PAIR_COLUMNS = ["source", "query", "document", "query_prefix", "document_prefix"]


@dataclass
class PairDataConfig:
    sources: list[SourceConfig]
    output: str
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    consistency_filter: bool = True
    top_k: int = 2  # keep a pair iff its document is in its query's top-k (reference: 2)
    chunk_size: int = 1_000_000  # pairs per exact-search chunk (reference index_size: 1M)
    max_chars: int = 100_000  # longer texts are quarantined as "too_long"
    num_cpus: float = 1.0  # per read task
    preserve_order: bool = True
    save_embeddings: bool = False  # also write the teacher embeddings to <output>/embeddings/ (audits, tests)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.chunk_size < 1:
            raise ValueError(f"top_k and chunk_size must be positive, got {self.top_k}, {self.chunk_size}")


def read_pairs(config: PairDataConfig, plans: list[FilePlan]):
    """Valid rows of every source with their prefix names (lazy)."""
    prefixes = {s.name: (s.query_prefix, s.document_prefix) for s in config.sources}
    ds = read_sources(config.sources, "pairs", config.output, config.max_chars, config.num_cpus, plans)
    return ds.map_batches(AttachPrefixNames(prefixes), batch_format="pyarrow")


def chunk_sizes(n: int, chunk_size: int) -> int:
    """Equal chunks of at most ``chunk_size`` (no tiny last chunk): the batch size that cuts ``n`` rows."""
    return math.ceil(n / math.ceil(n / chunk_size)) if n else chunk_size


@dataclass
class FilterResult:
    kept_keys: np.ndarray
    chunks: list[tuple[str, np.ndarray]]  # (source, row keys of the chunk in order)
    dropped_per_source: dict[str, int]


def consistency_filter(embedded, top_k: int, chunk_size: int, num_gpus: float = 0.0,
                       counts: dict[str, int] | None = None) -> FilterResult:  # fmt: skip
    """Materialised rows with ``key``, ``source``, ``query_emb``, ``document_emb`` -> keys of the kept pairs.

    One streaming pass in input order: rows are buffered per source and each full chunk goes to a search task
    at once; ``counts`` (rows per source, e.g. from the reader statistics) saves a counting pass.
    """
    import ray

    if counts is None:
        counts = Counter()
        for batch in embedded.select_columns(["source"]).iter_batches(batch_format="pyarrow", batch_size=None):
            counts.update(batch.column("source").to_pylist())
    sizes = {s: chunk_sizes(n, chunk_size) for s, n in counts.items()}
    search = remote(consistency_mask, num_gpus)
    buffers: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in counts}
    chunks, pending = [], []

    def submit(source: str, final: bool) -> None:
        parts = buffers[source]
        if not parts:
            return
        merged = {k: np.concatenate([p[k] for p in parts]) for k in ("key", "query_emb", "document_emb")}
        size = sizes[source]
        cut = len(merged["key"]) if final else (len(merged["key"]) // size) * size
        for start in range(0, cut, size):
            part = slice(start, min(start + size, cut))
            chunks.append((source, merged["key"][part]))
            pending.append(search.remote(merged["query_emb"][part], merged["document_emb"][part], top_k))
        buffers[source] = [{k: v[cut:] for k, v in merged.items()}] if cut < len(merged["key"]) else []

    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        for source in map(str, np.unique(batch["source"])):
            rows = batch["source"] == source
            buffers[source].append({k: np.asarray(batch[k])[rows] for k in ("key", "query_emb", "document_emb")})
            if sum(len(p["key"]) for p in buffers[source]) >= sizes[source]:
                submit(source, final=False)
    for source in sorted(buffers):
        submit(source, final=True)
    masks = [np.asarray(m) for m in ray.get(pending)]
    kept = [keys[m] for (_, keys), m in zip(chunks, masks, strict=True)]
    dropped = Counter({s: 0 for s in counts})
    for (source, keys), m in zip(chunks, masks, strict=True):
        dropped[source] += int(len(keys) - m.sum())
    return FilterResult(np.concatenate(kept) if kept else np.zeros(0, np.int64), chunks, dict(dropped))


class KeepKeys:
    """Rows whose ``key`` is in the kept set, reduced to the ``pairs/`` columns."""

    def __init__(self, keys: np.ndarray | None, columns: list[str]) -> None:
        self.keys = None if keys is None else np.sort(keys)
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.keys is not None:
            keys = batch.column("key").to_numpy()
            at = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
            keep = (self.keys[at] == keys) if len(self.keys) else np.zeros(len(keys), bool)
            batch = batch.filter(pa.array(keep))
        return batch.select([c for c in self.columns if c in batch.column_names])


def rows_per_source(output: str) -> dict[str, int]:
    fs, path = io.resolve(output)
    counts = Counter()
    for info in fs.get_file_info(io.pafs.FileSelector(path)):
        name = info.path.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".parquet"):
            counts.update(pq.read_table(info.path, columns=["source"], filesystem=fs).column("source").to_pylist())
    return dict(counts)


def run(config: PairDataConfig) -> dict:
    """Run the job (attaching to Ray or starting it) and return the manifest."""
    plans = preflight(config.sources, "pairs")
    ensure_ray()
    data_context(config.preserve_order)
    io.prepare_output(config.output, config.overwrite)
    kept_keys, filtered = None, {}
    if config.consistency_filter:
        pairs = read_pairs(config, plans).select_columns(["key", "source", "query", "document"])
        embedded = embed_dataset(pairs, ["query", "document"], config.teacher)
        embedded = embedded.select_columns(["key", "source", "query_emb", "document_emb"]).materialize()
        if config.save_embeddings:
            embedded.write_parquet(io.join(config.output, "embeddings"))
        counts = io.sum_stats(io.collect_stats(config.output))["rows_read_per_source"]
        result = consistency_filter(embedded, config.top_k, config.chunk_size, config.teacher.num_gpus, counts)
        kept_keys, filtered = result.kept_keys, result.dropped_per_source
        del embedded
    columns = PAIR_COLUMNS + (["negatives"] if any(s.negatives_column for s in config.sources) else [])
    out = read_pairs(config, plans).map_batches(KeepKeys(kept_keys, columns), batch_format="pyarrow")
    io.write_parts(out, config.output, "pair_data", len(plans))
    rows_out = io.finalize(config.output)
    stats = io.sum_stats(io.collect_stats(config.output))
    io.drop_scratch(config.output)
    if config.consistency_filter:
        stats = io.add_dropped(stats, "consistency_filter", filtered)
    dropped = stats["dropped_by_reason"]
    manifest = io.write_manifest(config.output, {
        "kind": "pairs", "rows_in": stats["rows_in"], "rows_out": rows_out, "dropped_by_reason": dropped,
        "dropped_per_source": stats["dropped_per_source"], "rows_per_source": rows_per_source(config.output),
        "negatives_dropped_by_reason": stats["negatives_dropped_by_reason"],
        "prefixes": {s.name: [s.query_prefix, s.document_prefix] for s in config.sources},
        "teacher": to_dict(config.teacher) if config.consistency_filter else None,
        "tokenizer": None, "config_fingerprint": fingerprint(config), "config": to_dict(config),
        "input_files": len(plans)})  # fmt: skip
    log.info("pairs: %d in, %d out, dropped %s", stats["rows_in"], rows_out, dropped)
    return manifest


def main() -> None:
    setup_logging()
    summary = run(cli(PairDataConfig, "Normalise pair sources, attach prefixes, consistency-filter, write pairs/"))
    keys = ("rows_in", "rows_out", "dropped_by_reason", "rows_per_source")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
