"""A BEIR retrieval set -> training pairs of its train queries, with a validation split carved from them.

    python -m evaluation.beir_split --config workflows/configs/beir_split.yaml [key=value ...]

Domain adaptation trains on a set's own train queries and must choose its hyper-parameters without looking
at the test queries. This job splits the judged queries of ``qrels/<train_split>.tsv`` by a seeded hash of the
query id: ``validation_fraction`` of them (at least one) become a BEIR folder ``validation/`` (the whole corpus,
those queries, their judgements as ``qrels/test.tsv``, so ``python -m evaluation --beir`` scores it as is); the
rest become ``train.jsonl`` (one row per judged (query, document): ``query``, ``document`` = title + " " + text as
`evaluation` joins them, ``query_id``, ``corpus_id``) for ``ops.mine_negatives``, and ``corpus.jsonl`` (the whole
corpus as ``{"_id", "text"}``) for it to mine from. The test queries are never read. ``manifest.json`` records
the split: the query ids on each side, the seed, the fraction and content hashes of the inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from evaluation.data import DataError, load_beir
from ops.config import cli, fingerprint, to_dict


@dataclass
class BeirSplitConfig:
    source: str  # a BEIR folder: corpus.jsonl, queries.jsonl, qrels/<train_split>.tsv
    output: str
    name: str = "scifact"  # names the validation task: beir/<name>-validation/...
    train_split: str = "train"
    validation_fraction: float = 0.2  # of the judged train queries
    seed: int = 42
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1) (got {self.validation_fraction})")
        if self.train_split == "test":
            raise ValueError("train_split must not be the test split: its queries are what the model is reported on")


def split_query_ids(query_ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation): the ``ceil(fraction * n)`` ids with the smallest sha256(seed:id) are validation.
    Independent of file order, so the same id always lands on the same side for a given seed."""
    ranked = sorted(query_ids, key=lambda q: hashlib.sha256(f"{seed}:{q}".encode()).hexdigest())
    held = set(ranked[: max(1, math.ceil(fraction * len(query_ids)))])
    return [q for q in query_ids if q not in held], [q for q in query_ids if q in held]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def run(config: BeirSplitConfig) -> dict:
    """Write ``train.jsonl``, ``corpus.jsonl``, ``validation/`` and ``manifest.json``; return the manifest."""
    source, output = Path(config.source), Path(config.output)
    data = load_beir(source, split=config.train_split, name=config.name)  # checks the files agree
    if (output / "manifest.json").exists() and not config.overwrite:
        raise DataError(f"{output} already holds a split; set overwrite: true to replace it")
    train_ids, validation_ids = split_query_ids(list(data.queries), config.validation_fraction, config.seed)
    output.mkdir(parents=True, exist_ok=True)
    with (output / "train.jsonl").open("w", encoding="utf-8") as handle:
        for q in train_ids:
            for doc_id, grade in data.qrels[q].items():
                if grade > 0:
                    row = {"query": data.queries[q], "document": data.document_texts([doc_id])[0], "query_id": q,
                           "corpus_id": doc_id}  # fmt: skip
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    doc_ids = list(data.corpus)
    with (output / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for doc_id, text in zip(doc_ids, data.document_texts(doc_ids), strict=True):
            handle.write(json.dumps({"_id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    validation = output / "validation"
    (validation / "qrels").mkdir(parents=True, exist_ok=True)
    (validation / "corpus.jsonl").write_bytes((source / "corpus.jsonl").read_bytes())
    with (validation / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for q in validation_ids:
            handle.write(json.dumps({"_id": q, "text": data.queries[q]}, ensure_ascii=False) + "\n")
    with (validation / "qrels" / "test.tsv").open("w", encoding="utf-8") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for q in validation_ids:
            handle.writelines(f"{q}\t{d}\t{g}\n" for d, g in data.qrels[q].items())
    manifest = {
        "kind": "beir_split", "source": str(source), "name": config.name, "train_split": config.train_split,
        "validation_fraction": config.validation_fraction, "seed": config.seed,
        "train_queries": len(train_ids), "validation_queries": len(validation_ids),
        "train_pairs": sum(1 for q in train_ids for g in data.qrels[q].values() if g > 0),
        "corpus_documents": len(doc_ids), "validation_task": f"{config.name}-validation",
        "train_query_ids": train_ids, "validation_query_ids": validation_ids,
        "inputs": {f: file_hash(source / f)
                   for f in ("corpus.jsonl", "queries.jsonl", f"qrels/{config.train_split}.tsv")},
        "config_fingerprint": fingerprint(config), "config": to_dict(config),
    }  # fmt: skip
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main() -> None:
    manifest = run(cli(BeirSplitConfig, "Split a BEIR set's train queries into training pairs and a validation set"))
    print(json.dumps({k: manifest[k] for k in ("train_queries", "validation_queries", "train_pairs",
                                              "corpus_documents")}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
