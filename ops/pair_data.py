"""Pair data job: read sources -> (query, document) + prefix names -> consistency filter -> ``pairs/`` (spec §5, §6).

    python -m ops.pair_data --config workflows/configs/pair_data.yaml [key=value ...]
    ray job submit --working-dir . -- python -m ops.pair_data --config workflows/configs/pair_data.yaml

One streaming pass after a cheap index pass (keys and sources only): the teacher embeds queries and documents in
an actor pool (fp16); a map gives each pair its chunk (a source's pairs in key order cut into equal chunks of at
most ``chunk_size``, from the per-source counts); the chunks meet in one shuffle and ``search_actors`` actors
search one chunk each, exactly (on a GPU when ``teacher.num_gpus`` > 0); a pair is kept iff its own document is
in its query's top ``top_k``. The kept pairs are written with their text; the driver sees counts only, and every
dropped pair is counted under ``consistency_filter`` (rows read minus rows written, per source).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ops import io
from ops.config import cli, fingerprint, to_dict
from ops.jobs import data_context, ensure_ray, log, setup_logging
from ops.pairs import AttachPrefixNames
from ops.readers import FilePlan, SourceConfig, preflight, read_sources
from ops.order import RowIndex, row_index
from ops.teacher import TeacherConfig, consistency_mask, embed_dataset

PAIR_COLUMNS = ["source", "query", "document", "query_prefix", "document_prefix"]


@dataclass
class PairDataConfig:
    sources: list[SourceConfig]
    output: str
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    consistency_filter: bool = True
    top_k: int = 2  # keep a pair iff its document is in its query's top-k (reference: 2)
    chunk_size: int = 1_000_000  # pairs per exact-search chunk (reference index_size: 1M)
    search_actors: int = 1  # chunks searched at once (each actor holds one chunk; GPU ones with teacher.num_gpus)
    search_cpus: float = 0.25  # logical CPUs per search actor (its matmul uses the node's cores or its GPU anyway)
    max_chars: int = 100_000  # longer texts are quarantined as "too_long"
    num_cpus: float = 1.0  # per read task
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per read/map task, e.g. {data_node: 1}
    preserve_order: bool = True
    save_embeddings: bool = False  # also write the teacher embeddings to <output>/embeddings/ (audits, tests)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.chunk_size < 1 or self.search_actors < 1:
            raise ValueError(f"top_k, chunk_size and search_actors must be positive, got {self.top_k}, "
                             f"{self.chunk_size}, {self.search_actors}")


def read_pairs(config: PairDataConfig, plans: list[FilePlan]):
    """Valid rows of every source with their prefix names (lazy)."""
    prefixes = {s.name: (s.query_prefix, s.document_prefix) for s in config.sources}
    ds = read_sources(config.sources, "pairs", config.output, config.max_chars, config.num_cpus, plans,
                      config.resources)
    return ds.map_batches(AttachPrefixNames(prefixes), batch_format="pyarrow", num_cpus=config.num_cpus,
                          resources=config.resources)


def chunk_sizes(n: int, chunk_size: int) -> int:
    """Equal chunks of at most ``chunk_size`` (no tiny last chunk): the batch size that cuts ``n`` rows."""
    return math.ceil(n / math.ceil(n / chunk_size)) if n else chunk_size


class AssignChunks:
    """``map_batches``: each row's search chunk, from its index within its source (`RowIndex` over ``key``) and
    the per-source counts: a source's rows in key order cut into equal chunks of at most ``chunk_size``."""

    def __init__(self, index: RowIndex, chunk_size: int) -> None:
        counts = index.counts
        self.index = index
        self.sizes = np.array([chunk_sizes(counts[name], chunk_size) for name in index.names], dtype=np.int64)
        chunks = [math.ceil(counts[name] / size) for name, size in zip(index.names, self.sizes, strict=True)]
        self.first = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64)
        self.num_chunks = int(sum(chunks))

    def __call__(self, batch: pa.Table) -> pa.Table:
        source, within = self.index.lookup(batch.column("key").to_numpy())
        return batch.append_column("chunk", pa.array(self.first[source] + within // self.sizes[source], pa.int64()))


class ChunkSearch:
    """``map_groups`` callable (an actor): one chunk's rows -> the same rows with ``kept`` = the pair's document
    is in its query's exact top-k among the chunk's documents (`consistency_mask`, on a GPU when the actor has
    one); the embeddings are dropped unless ``keep_embeddings``."""

    def __init__(self, top_k: int, keep_embeddings: bool) -> None:
        self.top_k, self.keep_embeddings = top_k, keep_embeddings

    def __call__(self, group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(set(group["source"].tolist())) != 1:
            raise RuntimeError(f"chunk {group['chunk'][0]} mixes sources {sorted(set(group['source'].tolist()))}")
        kept = consistency_mask(np.asarray(list(group["query_emb"])), np.asarray(list(group["document_emb"])),
                                self.top_k)
        dropped = () if self.keep_embeddings else ("query_emb", "document_emb", "chunk")
        return {**{k: v for k, v in group.items() if k not in dropped}, "kept": kept}


def consistency_filter(embedded, num_chunks: int, top_k: int, search_actors: int = 1, search_cpus: float = 0.25,
                       num_gpus: float = 0.0, keep_embeddings: bool = False, **remote_args):  # fmt: skip
    """Lazy: rows with ``chunk`` (`AssignChunks`), ``query_emb``, ``document_emb`` and any other columns -> the
    same rows with a bool ``kept`` column.

    The chunks meet in one shuffle (one partition per chunk, up to 1000) and ``search_actors`` actors search one
    chunk each at a time: at most that many chunks' embeddings are in a search, wherever the data is. The driver
    holds the counts behind ``num_chunks``, never an embedding or a key.
    """
    import ray

    return embedded.groupby("chunk", num_partitions=max(1, min(num_chunks, 1000))).map_groups(
        ChunkSearch, batch_format="numpy", fn_constructor_kwargs={"top_k": top_k, "keep_embeddings": keep_embeddings},
        compute=ray.data.ActorPoolStrategy(size=search_actors, max_tasks_in_flight_per_actor=1),
        num_gpus=num_gpus or None, num_cpus=search_cpus, **remote_args)  # fmt: skip


def rows_per_source(output: str, resources: dict[str, float] | None = None) -> dict[str, int]:
    """Rows per source of a finished folder, counted in Ray Data (the driver gets one number per source); the read
    tasks ask ``resources`` as the job's other data tasks do (e.g. ``{data_node: 1}``)."""
    import ray

    try:
        files = io.list_files(io.join(output, "part-*.parquet"))
    except io.DataError:  # nothing written: every row was dropped
        return {}
    remote_args = {"resources": resources} if resources else None
    counts = ray.data.read_parquet(files, columns=["source"], ray_remote_args=remote_args).groupby("source").count()
    counts = counts.take_all()
    return {row["source"]: int(row["count()"]) for row in counts}


class KeptPairs:
    """``map_batches``: the rows the filter kept (all rows without a ``kept`` column), reduced to ``columns``."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "kept" in batch.column_names:
            batch = batch.filter(batch.column("kept"))
        return batch.select([c for c in self.columns if c in batch.column_names])


def run(config: PairDataConfig) -> dict:
    """Run the job (attaching to Ray or starting it) and return the manifest."""
    plans = preflight(config.sources, "pairs")
    ensure_ray()
    data_context(config.preserve_order)
    io.prepare_output(config.output, config.overwrite)
    pairs = read_pairs(config, plans)
    if config.consistency_filter:
        index = row_index(pairs, id_column="key")  # a cheap first pass over the sources: keys and sources
        chunks = AssignChunks(index, config.chunk_size)
        embedded = embed_dataset(pairs.map_batches(chunks, batch_format="pyarrow", num_cpus=config.num_cpus,
                                                   resources=config.resources),
                                 ["query", "document"], config.teacher)  # fmt: skip
        pairs = consistency_filter(embedded, chunks.num_chunks, config.top_k, config.search_actors,
                                   config.search_cpus, config.teacher.num_gpus, keep_embeddings=config.save_embeddings)
        if config.save_embeddings:  # audits and tests: the filtered rows are materialised once for both writes
            pairs = pairs.materialize()
            pairs.select_columns(["key", "source", "query_emb", "document_emb"]).write_parquet(
                io.join(config.output, "embeddings"))
    columns = PAIR_COLUMNS + (["negatives"] if any(s.negatives_column for s in config.sources) else [])
    io.write_parts(pairs.map_batches(KeptPairs(columns), batch_format="pyarrow"), config.output, "pair_data",
                   len(plans))
    rows_out = io.finalize(config.output)
    stats = io.sum_stats(io.collect_stats(config.output))
    io.drop_scratch(config.output)
    out_per_source = rows_per_source(config.output, config.resources)
    if config.consistency_filter:  # rows read minus rows written, per source: the driver only ever counts
        stats = io.add_dropped(stats, "consistency_filter",
                               {s: n - out_per_source.get(s, 0) for s, n in index.counts.items()})
    dropped = stats["dropped_by_reason"]
    manifest = io.write_manifest(config.output, {
        "kind": "pairs", "rows_in": stats["rows_in"], "rows_out": rows_out, "dropped_by_reason": dropped,
        "dropped_per_source": stats["dropped_per_source"], "rows_per_source": out_per_source,
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
