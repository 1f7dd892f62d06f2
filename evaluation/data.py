"""Local evaluation data: BEIR folders, STS pair files, QMSum-style long documents, checked on read.

A malformed input fails here with `DataError` naming the file and the problem, before any model is loaded.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

SPLIT_NAMES = ("train", "dev", "validation", "test")


class DataError(ValueError):
    """A local task file that cannot be evaluated; the message names the file and the problem."""


@dataclass
class RetrievalData:
    """A BEIR-layout retrieval task: documents (title, text), queries and graded relevance."""

    name: str
    corpus: dict[str, dict[str, str]]  # id -> {"title", "text"}
    queries: dict[str, str]  # only queries that have judgements
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade}

    def document_texts(self, ids: list[str]) -> list[str]:
        """``title + " " + text`` stripped, as MTEB and the Nomic evaluation join them (spec §8)."""
        return [(self.corpus[i]["title"] + " " + self.corpus[i]["text"]).strip() for i in ids]


@dataclass
class PairData:
    """Sentence pairs with gold similarity scores (STS)."""

    name: str
    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]


def _read_jsonl(file: Path) -> list[dict]:
    rows = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{file}: line {number} is not a JSON object")
            rows.append(row)
    return rows


def _require(file: Path, row: dict, keys: tuple[str, ...], number: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{file}: line {number} lacks field(s) {missing}")


def task_name(path: Path) -> str:
    """Folder name, or for ``stsb/test.tsv`` the folder (a split name says nothing about the task)."""
    stem = path.stem if path.is_file() else path.name
    return path.parent.name if stem in SPLIT_NAMES else stem


def load_beir(folder: str | Path, split: str = "test", name: str | None = None,
              limit_queries: int | None = None, limit_corpus: int | None = None) -> RetrievalData:  # fmt: skip
    """Read ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv`` and check they agree.

    ``limit_queries`` keeps the first judged queries and ``limit_corpus`` the first documents plus every
    document those queries judge, so a slice is still a valid task (used by fast tests and smoke runs).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    corpus_file, queries_file = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_file = folder / "qrels" / f"{split}.tsv"
    for file in (corpus_file, queries_file, qrels_file):
        if not file.is_file():
            raise DataError(f"{file}: missing (a BEIR folder needs corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")

    qrels: dict[str, dict[str, int]] = {}
    with qrels_file.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise DataError(f"{qrels_file}: empty (expected a header query-id, corpus-id, score)")
        if [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise DataError(f"{qrels_file}: header is {header}; expected query-id, corpus-id, score")
        for number, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) < 3:
                raise DataError(f"{qrels_file}: line {number} has {len(row)} fields; expected 3")
            try:
                grade = int(float(row[2]))
            except ValueError:
                raise DataError(f"{qrels_file}: line {number} has a non-numeric score {row[2]!r}") from None
            qrels.setdefault(row[0], {})[row[1]] = grade
    if not qrels:
        raise DataError(f"{qrels_file}: no judgements")

    corpus: dict[str, dict[str, str]] = {}
    for number, row in enumerate(_read_jsonl(corpus_file), 1):
        _require(corpus_file, row, ("_id", "text"), number)
        corpus[str(row["_id"])] = {"title": str(row.get("title") or ""), "text": str(row["text"])}
    if not corpus:
        raise DataError(f"{corpus_file}: empty corpus")
    queries: dict[str, str] = {}
    for number, row in enumerate(_read_jsonl(queries_file), 1):
        _require(queries_file, row, ("_id", "text"), number)
        queries[str(row["_id"])] = str(row["text"])

    unknown_queries = sorted(set(qrels) - set(queries))
    if unknown_queries:
        raise DataError(f"{qrels_file}: {len(unknown_queries)} query id(s) not in {queries_file.name}, "
                        f"e.g. {unknown_queries[:5]}")  # fmt: skip
    unknown_docs = sorted({d for judged in qrels.values() for d in judged} - set(corpus))
    if unknown_docs:
        raise DataError(f"{qrels_file}: {len(unknown_docs)} corpus id(s) not in {corpus_file.name}, "
                        f"e.g. {unknown_docs[:5]}")  # fmt: skip

    query_ids = [q for q in queries if q in qrels]  # file order, judged only (MTEB drops the rest too)
    if limit_queries is not None:
        query_ids = query_ids[:limit_queries]
        qrels = {q: qrels[q] for q in query_ids}
    if limit_corpus is not None:
        keep = set(list(corpus)[:limit_corpus]) | {d for judged in qrels.values() for d in judged}
        corpus = {i: doc for i, doc in corpus.items() if i in keep}
    return RetrievalData(name or task_name(folder), corpus, {q: queries[q] for q in query_ids}, qrels)


def load_pairs(file: str | Path, name: str | None = None, limit: int | None = None) -> PairData:
    """A ``.tsv`` (header, tab-separated, no quoting) or ``.jsonl`` with sentence1, sentence2, score."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f"{file}: no such STS file (expected .tsv or .jsonl with sentence1, sentence2, score)")
    keys = ("sentence1", "sentence2", "score")
    if file.suffix == ".jsonl":
        rows = _read_jsonl(file)
        for number, row in enumerate(rows, 1):
            _require(file, row, keys, number)
    elif file.suffix in (".tsv", ".txt"):
        with file.open(encoding="utf-8", newline="") as handle:
            lines = handle.read().splitlines()
        if not lines:
            raise DataError(f"{file}: empty")
        header = lines[0].lstrip("\ufeff").split("\t")
        missing = [k for k in keys if k not in header]
        if missing:
            raise DataError(f"{file}: header {header} lacks column(s) {missing}")
        rows = []
        for number, line in enumerate(lines[1:], 2):
            fields = line.split("\t")
            if len(fields) < len(header):
                raise DataError(f"{file}: line {number} has {len(fields)} fields; the header has {len(header)}")
            rows.append(dict(zip(header, fields, strict=False)))
    else:
        raise DataError(f"{file}: unsupported suffix {file.suffix!r}; use .tsv or .jsonl")
    if not rows:
        raise DataError(f"{file}: no sentence pairs")
    rows = rows[:limit] if limit is not None else rows
    try:
        scores = [float(r["score"]) for r in rows]
    except ValueError as err:
        raise DataError(f"{file}: a score is not a number ({err})") from None
    return PairData(name or task_name(file), [str(r["sentence1"]) for r in rows], [str(r["sentence2"]) for r in rows],
                    scores)  # fmt: skip


def load_qmsum(file: str | Path, name: str = "qmsum", limit_meetings: int | None = None) -> RetrievalData:
    """QMSum as LoCo builds it from tau/scrolls: document = query + transcript, query = the answer (spec §8).

    Every (query, answer) pair gives one document, so a meeting's documents differ only in their opening query
    and retrieving the right one needs the long transcript as context, not just the first tokens.
    """
    file = Path(file)
    if file.is_dir():
        file = file / "test.jsonl"
    if not file.is_file():
        raise DataError(f"{file}: missing (expected QMSum jsonl with meeting_transcripts and query lists)")
    meetings = _read_jsonl(file)
    if not meetings:
        raise DataError(f"{file}: no meetings")
    corpus: dict[str, dict[str, str]] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for number, meeting in enumerate(meetings[:limit_meetings], 1):
        _require(file, meeting, ("meeting_transcripts",), number)
        transcript = "\n".join(f"{turn['speaker']}: {turn['content']}" for turn in meeting["meeting_transcripts"])
        pairs = meeting.get("general_query_list", []) + meeting.get("specific_query_list", [])
        if not pairs:
            raise DataError(f"{file}: line {number} has no queries")
        for k, pair in enumerate(pairs):
            key = f"m{number}-q{k}"
            corpus[key] = {"title": "", "text": pair["query"] + "\n\n" + transcript}
            queries[key] = pair["answer"]
            qrels[key] = {key: 1}
    return RetrievalData(name, corpus, queries, qrels)
