"""Hard-negative mining job: supervised pairs -> ``triplets/`` with ``num_negatives`` mined negatives (spec §7).

    python -m ops.mine_negatives --config workflows/configs/mine_negatives.yaml [key=value ...]
    ray job submit --working-dir . -- python -m ops.mine_negatives --config workflows/configs/mine_negatives.yaml

Per source, the corpus is every positive and every given negative, deduplicated by text, plus the documents of
``corpora[source]`` when given (a jsonl of ``{"text"}`` or ``{"title", "text"}``: e.g. a retrieval set's whole
corpus, so that a domain's train queries get negatives from the documents they are searched against). Each query
gets its exact top ``candidates`` documents of its source's corpus; `ops.teacher.select_negatives` removes the gold
documents and any text equal to the query, samples ``num_negatives`` (or, with ``keep_candidates``, keeps them all
for the trainer to sample per epoch) and tops up with random corpus documents. A row whose source holds fewer than
``min_negatives`` eligible texts is quarantined as ``too_few_negatives``, so the trainer never meets a short row.

Everything runs in Ray Data; the driver holds counts and object references only, O(sources + chunks + blocks):

1. Counts: rows per source (one aggregate).
2. Corpus: each row's texts (positive, given negatives) and the ``corpora`` documents, deduplicated per (source,
   text) in a hash-bucket shuffle keeping the first occurrence, sorted by (source, key, slot), where ``key`` is the
   row's key and ``slot`` 0 for the positive, i for the i-th given negative (corpora documents after every row,
   in file order). A document's ``position`` is its rank in that order within its source: the corpus order of a
   single-process ``dict.fromkeys`` over the rows in key order, which the seeded random top-up draws from. The
   ranks come from per-block counts (the driver sees one number per block and source).
3. The teacher embeds the corpus in an actor pool (fp16); the embedded corpus stays in the object store as blocks
   sorted by position, and the driver keeps their references per source.
4. Queries: each row gets a search chunk from a hash of its query text (about ``chunk_size`` rows; all rows of one
   query text share a chunk, so a query's gold set -- every positive of that query text -- is complete in it); the
   teacher embeds the queries; the chunks meet in one shuffle and ``search_actors`` actors each take one chunk at a
   time, stream its source's corpus blocks from the object store one by one, keep the exact top ``candidates`` per
   query (merged across blocks by score, then position: what one search over the whole corpus gives, ties
   included), look up the positions of the chunk's gold and query texts, select, and fetch the picked texts in a
   second pass over the blocks.
5. The rows, sorted by key again, are written; quarantined rows go to ``quarantine/too_few_negatives.jsonl`` from
   a Ray task; the manifest's per-source counts come from one aggregate.

Memory bound: a search actor holds one chunk (``chunk_size`` queries x dim fp16, their top ``candidates``) and one
corpus block at a time (Ray Data's target block size), never a whole corpus; at most ``search_actors`` chunks are
searched at once (GPU actors when ``teacher.num_gpus`` > 0). Each chunk reads its source's whole corpus from the
object store twice, so the search costs chunks x corpus: a larger ``chunk_size`` reads the corpus fewer times.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ops import io
from ops.config import cli, fingerprint, to_dict
from ops.jobs import data_context, ensure_ray, log, setup_logging
from ops.pair_data import PAIR_COLUMNS, read_pairs, rows_per_source
from ops.readers import PREVIEW_CHARS, SourceConfig, preflight
from ops.teacher import TeacherConfig, embed_dataset, merge_top, select_negative_indices, shard_top

CORPORA_KEY = 2**63 - 1  # the ``key`` of corpora documents: after every row's texts
MAX_PARTITIONS = 1000


@dataclass
class MineNegativesConfig:
    sources: list[SourceConfig]
    output: str
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    num_negatives: int = 7  # negatives per query (reference: 7)
    min_negatives: int | None = None  # rows with fewer eligible texts are quarantined; None = num_negatives
    keep_candidates: bool = False  # write every filtered top-`candidates` text: the trainer samples per epoch
    candidates: int = 20  # teacher top-k searched per query (reference script default 20)
    corpora: dict[str, str] = field(default_factory=dict)  # source name -> jsonl of documents to mine from too
    seed: int = 42
    chunk_size: int = 100_000  # queries per search chunk, about (each chunk reads its source's corpus)
    search_actors: int = 1  # chunks searched at once (GPU ones with teacher.num_gpus)
    search_cpus: float = 0.25  # logical CPUs per search actor
    search_partitions: int = 0  # partitions of the chunk shuffle; 0 = one per chunk (up to 1000). Fewer: fewer
    #   shuffle aggregators (each costs seconds on a small machine), more chunks held per partition
    max_chars: int = 100_000
    num_cpus: float = 1.0  # per read task
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per read task, e.g. {data_node: 1}
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.num_negatives < 1 or self.candidates < self.num_negatives:
            raise ValueError(f"need 1 <= num_negatives ({self.num_negatives}) <= candidates ({self.candidates})")
        if self.min_negatives is not None and not 1 <= self.min_negatives <= self.num_negatives:
            raise ValueError(f"need 1 <= min_negatives ({self.min_negatives}) <= num_negatives ({self.num_negatives})")
        if self.chunk_size < 1 or self.search_actors < 1 or self.search_partitions < 0:
            raise ValueError(f"chunk_size and search_actors must be positive and search_partitions >= 0, got "
                             f"{self.chunk_size}, {self.search_actors}, {self.search_partitions}")  # fmt: skip

    @property
    def least_negatives(self) -> int:
        return self.num_negatives if self.min_negatives is None else self.min_negatives


def text_hash(texts: list[str]) -> np.ndarray:
    """A stable 63-bit hash per text, the same in every process (buckets and chunks)."""
    return np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") >> 1
                     for t in texts], dtype=np.int64)  # fmt: skip


def read_corpus(path: str) -> list[str]:
    """A jsonl of documents -> texts (``title + " " + text`` stripped when there is a title)."""
    texts = []
    for number, line in enumerate(io.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = (str(row.get("title") or "") + " " + str(row["text"])).strip()
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ValueError(f"{path}: line {number} is not a JSON object with a text field ({err})") from None
        if text:
            texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no documents")
    return texts


def corpus_file(source: str, path: str) -> pa.Table:
    """A Ray task: one ``corpora`` file -> corpus entries (after every row's texts, in file order)."""
    texts = read_corpus(path)
    return pa.table({"source": pa.array([source] * len(texts), pa.string()), "text": pa.array(texts, pa.string()),
                     "key": pa.array(np.full(len(texts), CORPORA_KEY), pa.int64()),
                     "slot": pa.array(np.arange(len(texts)), pa.int64())})  # fmt: skip


class CorpusEntries:
    """``map_batches``: rows -> one entry per corpus text occurrence (``source``, ``text``, ``key``, ``slot``: 0
    for the positive, i for the i-th given negative) with its dedup ``bucket``."""

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        parts = [pa.table({"source": batch.column("source"), "text": batch.column("document"),
                           "key": batch.column("key"), "slot": pa.array(np.zeros(n, np.int64))})]  # fmt: skip
        if "negatives" in batch.column_names:
            lists = batch.column("negatives").combine_chunks()
            parent = pc.list_parent_indices(lists).to_numpy()  # ascending: the i-th item of a list is its slot i
            slot = np.arange(len(parent)) - np.searchsorted(parent, parent) + 1
            parts.append(pa.table({"source": batch.column("source").take(parent),
                                   "text": pc.list_flatten(lists).cast(pa.string()),
                                   "key": batch.column("key").take(parent),
                                   "slot": pa.array(slot.astype(np.int64))}))  # fmt: skip
        return with_bucket(pa.concat_tables(parts), self.buckets)


def with_bucket(entries: pa.Table, buckets: int) -> pa.Table:
    names = entries.column("source").to_pylist()
    texts = entries.column("text").to_pylist()
    hashes = text_hash([f"{s}\0{t}" for s, t in zip(names, texts, strict=True)])
    return entries.append_column("bucket", pa.array(hashes % buckets, pa.int64()))


def first_occurrences(group: pa.Table) -> pa.Table:
    """``map_groups`` over a dedup bucket: each (source, text) once, at its first (key, slot)."""
    group = group.sort_by([("source", "ascending"), ("text", "ascending"), ("key", "ascending"),
                           ("slot", "ascending")])  # fmt: skip
    source, text = group.column("source"), group.column("text")
    first = np.ones(group.num_rows, dtype=bool)
    if group.num_rows > 1:
        differ = pc.or_(pc.not_equal(source[1:], source[:-1]), pc.not_equal(text[1:], text[:-1]))
        first[1:] = differ.to_numpy(zero_copy_only=False)
    return group.filter(pa.array(first)).select(["source", "text", "key", "slot"])


def block_counts(block: pa.Table) -> dict[str, int]:
    """A Ray task: rows per source of one block."""
    names, counts = np.unique(np.asarray(block.column("source").to_pylist(), dtype=object), return_counts=True)
    return {str(s): int(c) for s, c in zip(names, counts, strict=True)}


def with_positions(block: pa.Table, offsets: dict[str, int]) -> pa.Table:
    """A Ray task: a block of the corpus sorted by (source, key, slot) + ``position`` (rank within the source),
    given each source's rank at the block's first row."""
    names = np.asarray(block.column("source").to_pylist(), dtype=object)
    position = np.zeros(len(names), dtype=np.int64)
    for name in np.unique(names):
        rows = np.flatnonzero(names == name)  # one run: the block is sorted by source
        position[rows] = offsets[str(name)] + np.arange(len(rows))
    return block.select(["source", "text"]).append_column("position", pa.array(position))


def block_sources(block: pa.Table) -> list[str]:
    return sorted(set(block.column("source").to_pylist()))


def tensor(block: pa.Table, column: str) -> np.ndarray:
    from ray.data.block import BlockAccessor

    return np.asarray(BlockAccessor.for_block(block.select([column])).to_numpy(column))


Embed = Callable[..., object]  # (dataset, text columns) -> the dataset + one ``<column>_emb`` per column


def embed_corpus(pairs, counts: dict[str, int], config: MineNegativesConfig, embed: Embed):
    """Steps 2 and 3: the embedded corpus as block references per source, and the corpus size per source."""
    import ray

    buckets = max(1, min(MAX_PARTITIONS, math.ceil(sum(counts.values()) / config.chunk_size)))
    entries = pairs.map_batches(CorpusEntries(buckets), batch_format="pyarrow", num_cpus=config.num_cpus,
                                resources=config.resources)  # fmt: skip
    if config.corpora:
        task = ray.remote(num_cpus=config.num_cpus)(corpus_file)
        files = ray.data.from_arrow_refs([task.remote(s, p) for s, p in sorted(config.corpora.items())])
        entries = entries.union(files.map_batches(with_bucket, fn_args=(buckets,), batch_format="pyarrow"))
    unique = entries.groupby("bucket", num_partitions=buckets).map_groups(first_occurrences, batch_format="pyarrow")
    ordered = unique.sort(["source", "key", "slot"]).to_arrow_refs()
    per_block = ray.get([ray.remote(num_cpus=0.25)(block_counts).remote(ref) for ref in ordered])
    sizes: dict[str, int] = {}
    offsets = []
    for counted in per_block:
        offsets.append({s: sizes.get(s, 0) for s in counted})
        for s, n in counted.items():
            sizes[s] = sizes.get(s, 0) + n
    position = ray.remote(num_cpus=0.25)(with_positions)
    corpus = ray.data.from_arrow_refs([position.remote(ref, off) for ref, off in zip(ordered, offsets, strict=True)])
    embedded = embed(corpus, ["text"]).select_columns(["source", "position", "text", "text_emb"]).materialize()
    blocks = embedded.to_arrow_refs()
    names = ray.get([ray.remote(num_cpus=0.25)(block_sources).remote(ref) for ref in blocks])
    by_source: dict[str, list] = {}
    for ref, present in zip(blocks, names, strict=True):
        for s in present:
            by_source.setdefault(s, []).append(ref)
    return by_source, sizes


class QueryChunks:
    """``map_batches``: each row's search ``chunk`` from a hash of its query text: a source of n rows gets
    ceil(n / chunk_size) chunks, and all rows of one query text land in the same one. The given negatives are
    dropped (they are in the corpus; the row gets mined ones)."""

    def __init__(self, counts: dict[str, int], chunk_size: int) -> None:
        self.names = sorted(counts)
        chunks = np.array([math.ceil(counts[s] / chunk_size) for s in self.names], dtype=np.int64)
        self.chunks = dict(zip(self.names, chunks.tolist(), strict=True))
        self.first = dict(zip(self.names, np.concatenate([[0], np.cumsum(chunks)[:-1]]).tolist(), strict=True))
        self.num_chunks = int(chunks.sum())

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = batch.column("source").to_pylist()
        hashes = text_hash([str(q) for q in batch.column("query").to_pylist()])
        chunk = [self.first[s] + int(h) % self.chunks[s] for s, h in zip(names, hashes, strict=True)]
        batch = batch.drop_columns([c for c in ("negatives",) if c in batch.column_names])  # in the corpus already
        return batch.append_column("chunk", pa.array(chunk, pa.int64()))


class ChunkMine:
    """``map_groups`` callable (an actor): one chunk's rows (one source) -> the same rows with ``negatives`` (null:
    too few eligible texts), ``available``, ``topped_up``, ``short``; the query embeddings dropped."""

    def __init__(self, corpus, sizes: dict[str, int], config: dict) -> None:
        import ray

        self.blocks, self.sizes, self.config = ray.get(corpus), sizes, config

    def corpus_blocks(self, source: str):
        """The source's corpus blocks (``position``, ``text``, ``text_emb``), fetched one at a time."""
        import ray

        for ref in self.blocks[source]:
            block = ray.get(ref)
            block = block.filter(pc.equal(block.column("source"), source))
            if block.num_rows:
                yield block

    def __call__(self, group: pa.Table) -> pa.Table:
        names = set(group.column("source").to_pylist())
        if len(names) != 1:
            raise RuntimeError(f"chunk {group.column('chunk')[0]} mixes sources {sorted(names)}")
        source, config = names.pop(), self.config
        queries, documents = group.column("query").to_pylist(), group.column("document").to_pylist()
        query_emb = tensor(group, "query_emb")
        needles = pa.array(list(dict.fromkeys(documents + queries)), pa.string())
        found = np.full(len(needles), -1, dtype=np.int64)
        top = None
        for block in self.corpus_blocks(source):
            positions = block.column("position").to_numpy()
            part = shard_top(query_emb, tensor(block, "text_emb"), positions, config["candidates"])
            top = part if top is None else merge_top(top, part, config["candidates"])
            at = pc.index_in(needles, value_set=block.column("text")).fill_null(-1).to_numpy()
            found[at >= 0] = positions[at[at >= 0]]
        where = dict(zip(needles.to_pylist(), found.tolist(), strict=True))
        golds: dict[str, set[int]] = {}
        for query, document in zip(queries, documents, strict=True):
            golds.setdefault(query, set()).add(where[document])
        banned = [golds[q] | ({where[q]} if where[q] >= 0 else set()) for q in queries]
        picked = select_negative_indices(top[1], self.sizes[source], banned, config["num_negatives"], config["seed"],
                                         group.column("key").to_pylist(), config["least_negatives"],
                                         config["keep_candidates"])  # fmt: skip
        texts = self.texts_at(source, {j for p in picked.picked if p is not None for j in p})
        negatives = [None if p is None else [texts[j] for j in p] for p in picked.picked]
        out = group.drop_columns(["query_emb", "chunk"])
        counts = [None if n is None else len(n) for n in negatives]
        return out.append_column("negatives", pa.array(negatives, pa.list_(pa.string()))).append_column(
            "negatives_count", pa.array(counts, pa.int64())).append_column(
            "available", pa.array(picked.available, pa.int64())).append_column(
            "topped_up", pa.array(np.array(picked.topped_up, np.int64))).append_column(
            "short", pa.array(np.array(picked.short, np.int64))).append_column(
            "quarantined", pa.array([int(n is None) for n in negatives], pa.int64()))  # fmt: skip

    def texts_at(self, source: str, wanted: set[int]) -> dict[int, str]:
        """Corpus positions -> texts, from a second pass over the source's blocks."""
        wanted_sorted = np.array(sorted(wanted), dtype=np.int64)
        texts: dict[int, str] = {}
        for block in self.corpus_blocks(source) if len(wanted_sorted) else ():
            positions = block.column("position").to_numpy()
            hit = wanted_sorted[(wanted_sorted >= positions[0]) & (wanted_sorted <= positions[-1])]
            rows = np.searchsorted(positions, hit)
            rows = rows[positions[rows] == hit]
            texts.update(zip(positions[rows].tolist(), block.column("text").take(pa.array(rows)).to_pylist(),
                             strict=True))  # fmt: skip
        return texts


def mine(pairs, config: MineNegativesConfig, embed: Embed | None = None):
    """Lazy rows (``source``, ``file``, ``line``, ``key``, ``query``, ``document`` [, ``negatives``], ...) -> the
    same rows sorted by key with `ChunkMine`'s columns, materialised in the object store. ``embed``: the teacher
    (`embed_dataset` with ``config.teacher``) unless a stand-in is given (benchmarks)."""
    import ray

    if embed is None:
        def embed(ds, columns):
            return embed_dataset(ds, columns, config.teacher)

    counted = pairs.select_columns(["source"]).groupby("source").count().take_all()
    counts = {row["source"]: int(row["count()"]) for row in counted}
    unknown = sorted(set(config.corpora) - set(counts))
    if unknown:
        raise ValueError(f"corpora name source(s) {unknown} that are not among the sources {sorted(counts)}")
    log.info("mining: %d rows in %d sources; building and embedding the corpus", sum(counts.values()), len(counts))
    corpus, sizes = embed_corpus(pairs, counts, config, embed)
    log.info("mining: corpus of %d texts embedded; searching", sum(sizes.values()))
    chunks = QueryChunks(counts, config.chunk_size)
    embedded = embed(pairs.map_batches(chunks, batch_format="pyarrow", num_cpus=config.num_cpus,
                                       resources=config.resources), ["query"])  # fmt: skip
    settings = {"candidates": config.candidates, "num_negatives": config.num_negatives, "seed": config.seed,
                "least_negatives": config.least_negatives, "keep_candidates": config.keep_candidates}  # fmt: skip
    searched = embedded.groupby("chunk", num_partitions=max(1, min(chunks.num_chunks, config.search_partitions or MAX_PARTITIONS))).map_groups(
        ChunkMine, batch_format="pyarrow",
        fn_constructor_kwargs={"corpus": ray.put(corpus), "sizes": sizes, "config": settings},
        compute=ray.data.ActorPoolStrategy(size=config.search_actors, max_tasks_in_flight_per_actor=1),
        num_gpus=config.teacher.num_gpus or None, num_cpus=config.search_cpus)  # fmt: skip
    return searched.sort("key").materialize()


@dataclass
class MinedCounts:
    """What the manifest reports of a mined dataset: one value per source."""

    quarantined: dict[str, int]
    topped_up: dict[str, int]
    short: dict[str, int]
    negatives_per_row: dict[str, int | None]


def mined_counts(mined) -> MinedCounts:
    from ray.data.aggregate import Max, Min, Sum

    rows = mined.groupby("source").aggregate(Sum("quarantined"), Sum("topped_up"), Sum("short"),
                                             Min("negatives_count"), Max("negatives_count")).take_all()  # fmt: skip
    per = {name: {r["source"]: int(r[f"sum({name})"]) for r in rows} for name in ("quarantined", "topped_up", "short")}
    lows = [r["min(negatives_count)"] for r in rows if r["min(negatives_count)"] is not None]
    highs = [r["max(negatives_count)"] for r in rows if r["max(negatives_count)"] is not None]
    return MinedCounts(per["quarantined"], per["topped_up"], per["short"],
                       {"min": int(min(lows)) if lows else None, "max": int(max(highs)) if highs else None})


def kept_triplets(batch: pa.Table) -> pa.Table:
    """``map_batches``: rows with negatives, reduced to the pair columns + ``negatives``."""
    batch = batch.filter(pc.equal(batch.column("quarantined"), 0))
    return batch.select([c for c in PAIR_COLUMNS if c in batch.column_names] + ["negatives"])


def write_quarantine(path: str, blocks: list, needed: int) -> int:
    """A Ray task: quarantined rows (block references, in key order) -> one jsonl, streamed block by block."""
    import ray

    fs, p = io.resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    written = 0
    with fs.open_output_stream(p) as out:
        for ref in blocks:
            for r in ray.get(ref).to_pylist():
                out.write((json.dumps({"source": r["source"], "file": r["file"], "line": r["line"],
                                       "reason": "too_few_negatives", "text": r["query"][:PREVIEW_CHARS],
                                       "negatives_available": r["available"], "negatives_needed": needed},
                                      ensure_ascii=False) + "\n").encode())  # fmt: skip
                written += 1
    return written


def write_mined(mined, output: str, least_negatives: int, input_files: int) -> tuple[int, MinedCounts]:
    """The kept rows as parts (`ops.io`), the quarantined ones as ``quarantine/too_few_negatives.jsonl`` ->
    (rows written, counts)."""
    import ray

    io.write_parts(mined.map_batches(kept_triplets, batch_format="pyarrow"), output, "mine_negatives", input_files)
    counts = mined_counts(mined)
    if sum(counts.quarantined.values()):
        blocks = mined.filter(expr="quarantined == 1").select_columns(
            ["source", "file", "line", "query", "available"]).to_arrow_refs()  # fmt: skip
        ray.get(ray.remote(num_cpus=0.25)(write_quarantine).remote(
            io.join(output, io.QUARANTINE_DIR, "too_few_negatives.jsonl"), blocks, least_negatives))
    return io.finalize(output), counts


def run(config: MineNegativesConfig) -> dict:
    """Run the job (attaching to Ray or starting it) and return the manifest."""
    plans = preflight(config.sources, "pairs")
    ensure_ray()
    data_context(True)
    io.prepare_output(config.output, config.overwrite)
    mined = mine(read_pairs(config, plans), config)
    rows_out, counts = write_mined(mined, config.output, config.least_negatives, len(plans))
    stats = io.sum_stats(io.collect_stats(config.output))
    io.drop_scratch(config.output)
    quarantined = {s: n for s, n in counts.quarantined.items() if n}
    if quarantined:
        stats = io.add_dropped(stats, "too_few_negatives", quarantined)
    manifest = io.write_manifest(config.output, {
        "kind": "triplets", "rows_in": stats["rows_in"], "rows_out": rows_out,
        "dropped_by_reason": stats["dropped_by_reason"], "dropped_per_source": stats["dropped_per_source"],
        "negatives_dropped_by_reason": stats["negatives_dropped_by_reason"],
        "rows_per_source": rows_per_source(config.output, config.resources),
        "rows_topped_up_with_random": counts.topped_up,
        "rows_short_of_num_negatives": counts.short, "num_negatives": config.num_negatives,
        "min_negatives": config.least_negatives, "keep_candidates": config.keep_candidates,
        "negatives_per_row": counts.negatives_per_row,
        "teacher": to_dict(config.teacher), "tokenizer": None, "config_fingerprint": fingerprint(config),
        "config": to_dict(config), "input_files": len(plans)})  # fmt: skip
    log.info("triplets: %d in, %d out, dropped %s", stats["rows_in"], rows_out, stats["dropped_by_reason"])
    return manifest


def main() -> None:
    setup_logging()
    summary = run(cli(MineNegativesConfig, "Mine teacher hard negatives for supervised pairs, write triplets/"))
    keys = ("rows_in", "rows_out", "dropped_by_reason", "negatives_dropped_by_reason", "rows_per_source",
            "rows_topped_up_with_random", "rows_short_of_num_negatives")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
