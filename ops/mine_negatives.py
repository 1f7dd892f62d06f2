"""Hard-negative mining job: supervised pairs -> ``triplets/`` with ``num_negatives`` mined negatives (spec §7).

    python -m ops.mine_negatives --config workflows/configs/mine_negatives.yaml [key=value ...]
    ray job submit --working-dir . -- python -m ops.mine_negatives --config workflows/configs/mine_negatives.yaml

Per source, the corpus is every positive and every given negative, deduplicated by text, plus the documents of
``corpora[source]`` when given (a jsonl of ``{"text"}`` or ``{"title", "text"}``: e.g. a retrieval set's whole
corpus, so that a domain's train queries get negatives from the documents they are searched against). The teacher
embeds queries and corpus in one actor-pool pass; an exact search (a Ray task, GPU when ``teacher.num_gpus`` > 0)
returns each query's top ``candidates`` documents; `ops.teacher.select_negatives` removes the gold document
and any text equal to the query, samples ``num_negatives`` (or, with ``keep_candidates``, keeps them all for the
trainer to sample per epoch) and tops up with random corpus documents. A row whose source holds fewer than
``min_negatives`` eligible texts is quarantined as ``too_few_negatives``, so the trainer never meets a short row.
Supervised sets are small next to the pretraining pairs (~1M rows), so rows and embeddings are gathered on the
driver.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ops import io
from ops.config import cli, fingerprint, to_dict
from ops.jobs import data_context, ensure_ray, log, setup_logging
from ops.pair_data import PAIR_COLUMNS, read_pairs, rows_per_source
from ops.readers import PREVIEW_CHARS, SourceConfig, preflight
from ops.teacher import TeacherConfig, embed_dataset, remote, select_negatives, topk_search


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
    max_chars: int = 100_000
    num_cpus: float = 1.0  # per read task
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per read task, e.g. {data_node: 1}
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.num_negatives < 1 or self.candidates < self.num_negatives:
            raise ValueError(f"need 1 <= num_negatives ({self.num_negatives}) <= candidates ({self.candidates})")
        if self.min_negatives is not None and not 1 <= self.min_negatives <= self.num_negatives:
            raise ValueError(f"need 1 <= min_negatives ({self.min_negatives}) <= num_negatives ({self.num_negatives})")

    @property
    def least_negatives(self) -> int:
        return self.num_negatives if self.min_negatives is None else self.min_negatives


def embed_texts(texts: list[str], teacher: TeacherConfig) -> np.ndarray:
    """Texts -> [n, dim] teacher embeddings in input order, through the actor pool."""
    import ray

    ds = ray.data.from_arrow(pa.table({"i": np.arange(len(texts)), "text": texts}))
    out = embed_dataset(ds, ["text"], teacher, rows=len(texts)).select_columns(["i", "text_emb"]).take_all()
    out.sort(key=lambda r: r["i"])
    return np.stack([r["text_emb"] for r in out]) if out else np.zeros((0, 0), np.float32)


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


@dataclass
class Mined:
    table: pa.Table  # the kept rows with their ``negatives``
    quarantined: list[dict]  # rows with fewer than min_negatives eligible texts in their source
    topped_up: dict[str, int]  # rows per source that needed random corpus documents
    short: dict[str, int]  # rows per source kept with min_negatives <= negatives < num_negatives


def mine(table: pa.Table, config: MineNegativesConfig) -> Mined:
    """Rows of one or more sources (``key``, ``query``, ``document`` [, ``negatives``]) -> + mined ``negatives``."""
    import ray

    queries, positives = table.column("query").to_pylist(), table.column("document").to_pylist()
    given = table.column("negatives").to_pylist() if "negatives" in table.column_names else [None] * len(queries)
    given = [g or [] for g in given]
    sources = table.column("source").to_pylist()
    keys = table.column("key").to_pylist()
    names = sorted(set(sources))
    unknown = sorted(set(config.corpora) - set(names))
    if unknown:
        raise ValueError(f"corpora name source(s) {unknown} that are not among the sources {names}")
    corpora = {s: list(dict.fromkeys([*(t for i, src in enumerate(sources) if src == s
                                        for t in [positives[i], *given[i]]),
                                      *(read_corpus(config.corpora[s]) if s in config.corpora else [])]))
               for s in names}  # fmt: skip
    texts = queries + [t for s in names for t in corpora[s]]
    emb = embed_texts(texts, config.teacher)
    q_emb, offset = emb[: len(queries)], len(queries)
    search = remote(topk_search, config.teacher.num_gpus)
    negatives: list[list[str] | None] = [None] * len(queries)
    available = [0] * len(queries)
    topped_up, short = {}, {}
    golds: dict[tuple[str, str], set[str]] = {}
    for src, q, d in zip(sources, queries, positives, strict=True):
        golds.setdefault((src, q), set()).add(d)
    for s in names:
        rows = [i for i, src in enumerate(sources) if src == s]
        corpus = corpora[s]
        c_emb = emb[offset: offset + len(corpus)]
        offset += len(corpus)
        top = ray.get(search.remote(q_emb[rows], c_emb, config.candidates))
        row_queries, row_keys = [queries[i] for i in rows], [keys[i] for i in rows]
        row_golds = [golds[(s, q)] for q in row_queries]
        picked = select_negatives(top, corpus, row_queries, row_golds, config.num_negatives, config.seed, row_keys,
                                  config.least_negatives, config.keep_candidates)  # fmt: skip
        topped_up[s], short[s] = picked.topped_up, picked.short
        for i, negs, count in zip(rows, picked.negatives, picked.available, strict=True):
            negatives[i], available[i] = negs, count
    files, lines = table.column("file").to_pylist(), table.column("line").to_pylist()
    quarantined = [{"source": sources[i], "file": files[i], "line": lines[i], "reason": "too_few_negatives",
                    "text": queries[i][:PREVIEW_CHARS], "negatives_available": available[i],
                    "negatives_needed": config.least_negatives}
                   for i, negs in enumerate(negatives) if negs is None]  # fmt: skip
    out = table.select([c for c in PAIR_COLUMNS if c in table.column_names])
    out = out.append_column("negatives", pa.array(negatives, pa.list_(pa.string())))
    return Mined(out.filter(pa.array([n is not None for n in negatives])), quarantined, topped_up, short)


def run(config: MineNegativesConfig) -> dict:
    """Run the job (attaching to Ray or starting it) and return the manifest."""
    import ray

    plans = preflight(config.sources, "pairs")
    ensure_ray()
    data_context(True)
    io.prepare_output(config.output, config.overwrite)
    table = pa.concat_tables(ray.get(read_pairs(config, plans).to_arrow_refs()), promote_options="default")
    mined = mine(table, config)
    io.write_parts(ray.data.from_arrow(mined.table), config.output, "mine_negatives", len(plans))
    if mined.quarantined:
        io.write_jsonl(io.join(config.output, io.QUARANTINE_DIR, "too_few_negatives.jsonl"), mined.quarantined)
    rows_out = io.finalize(config.output)
    stats = io.sum_stats(io.collect_stats(config.output))
    io.drop_scratch(config.output)
    if mined.quarantined:
        stats = io.add_dropped(stats, "too_few_negatives", dict(Counter(q["source"] for q in mined.quarantined)))
    lengths = pc.list_value_length(mined.table.column("negatives"))
    manifest = io.write_manifest(config.output, {
        "kind": "triplets", "rows_in": stats["rows_in"], "rows_out": rows_out,
        "dropped_by_reason": stats["dropped_by_reason"], "dropped_per_source": stats["dropped_per_source"],
        "negatives_dropped_by_reason": stats["negatives_dropped_by_reason"],
        "rows_per_source": rows_per_source(config.output), "rows_topped_up_with_random": mined.topped_up,
        "rows_short_of_num_negatives": mined.short, "num_negatives": config.num_negatives,
        "min_negatives": config.least_negatives, "keep_candidates": config.keep_candidates,
        "negatives_per_row": {"min": pc.min(lengths).as_py(), "max": pc.max(lengths).as_py()},
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
