"""Readers: text / jsonl / parquet / Hugging Face ``datasets`` (local or object storage) -> validated rows.

One Ray task reads one input file and streams it in blocks, so a bad row is known with its exact location
(file and 1-based line for text and jsonl, 0-based row for parquet and arrow). Rows that cannot be used are not
passed on: they go to ``quarantine/`` with their reason, and every file leaves its counts in ``_stats/``
(see `ops.io`). Wrong paths and wrong column names raise `DataError` in `preflight`, before any work starts.

Output columns: ``source``, ``file``, ``line``, ``key`` (int64, unique per row) and the fields asked for
(``text``; or ``query``, ``document`` and ``negatives`` for pairs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ops import io
from ops.io import DataError

Format = Literal["auto", "text", "jsonl", "parquet", "arrow", "hf"]
REASONS = ("empty", "not_utf8", "malformed_json", "missing_column", "not_text", "too_long")
TEXT_SUFFIXES = (".txt", ".raw", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst")
PREVIEW_CHARS = 1000
READ_BYTES = 16 * 2**20
KEY_SHIFT = 40  # a row's ``key`` = file sequence number << 40 | line: unique across all sources
Record = tuple[int, dict[str, Any] | None, str | None, str]  # (location, raw record, reason, preview)


@dataclass
class SourceConfig:
    """One input source. Column names are per source, so a new pair set needs config, not code."""

    name: str
    path: str  # file, folder, glob (``*.jsonl``), ``s3://``/``gs://`` URI, saved HF folder or Hub id
    format: Format = "auto"
    # text files: "blank_line" = blocks separated by blank lines (Wikipedia dumps), "line", "file" (a book)
    doc_split: Literal["blank_line", "line", "file"] = "blank_line"
    text_column: str = "text"  # MLM sources in jsonl / parquet / HF
    query_column: str = "query"  # pair sources
    document_column: str = "document"
    negatives_column: str | None = None  # a list of strings or one string per row
    query_prefix: str = "search_query"  # task names of nomicbert.embed.TASK_PREFIXES (spec §5, §7)
    document_prefix: str = "search_document"
    hf_name: str | None = None  # HF config name
    hf_split: str = "train"
    max_rows_per_file: int | None = None  # for demos and tests: read only the first N records of each file


def detect_format(source: SourceConfig) -> str:
    if source.format != "auto":
        return source.format
    path = source.path.rstrip("/")
    if path.startswith("hf://"):
        return "hf"
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".arrow"):
        return "arrow"
    if not io.is_remote(path) and io.exists(path):
        for marker in ("dataset_info.json", "state.json", "dataset_dict.json"):
            if io.exists(io.join(path, marker)):
                return "hf"
        raise DataError(f"source {source.name}: cannot tell the format of folder {path}; set format: "
                        "text | jsonl | parquet | arrow | hf")  # fmt: skip
    if not io.is_remote(path) and not path.startswith((".", "/", "~")) and path.count("/") == 1:
        return "hf"
    raise DataError(f"source {source.name}: cannot tell the format of {path}; set format explicitly")


def _load_hf(source: SourceConfig) -> Any:
    """A saved folder (``save_to_disk``) or a Hub id -> an arrow-backed ``datasets.Dataset`` of the split."""
    import datasets

    path = source.path.removeprefix("hf://")
    try:
        if io.exists(path) and not io.is_remote(path):
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, source.hf_name, split=source.hf_split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise DataError(f"source {source.name}: cannot load Hugging Face dataset {path}: {err}") from err
    if isinstance(ds, datasets.DatasetDict):
        if source.hf_split not in ds:
            raise DataError(f"source {source.name}: split {source.hf_split!r} not in {list(ds)}")
        ds = ds[source.hf_split]
    if ds._indices is not None:  # a shuffled/selected view: the arrow files would not hold its rows in order
        ds = ds.flatten_indices()
    return ds


def wanted_columns(source: SourceConfig, kind: Literal["text", "pairs"]) -> dict[str, str]:
    """Output field -> input column for this source."""
    if kind == "text":
        return {"text": source.text_column}
    cols = {"query": source.query_column, "document": source.document_column}
    if source.negatives_column:
        cols["negatives"] = source.negatives_column
    return cols


@dataclass
class FilePlan:
    source: str
    file: str
    format: str
    key: str  # deterministic name of this file's quarantine and stats files
    seq: int = 0  # position of the file among all input files: row key = seq << 40 | line


def preflight(sources: list[SourceConfig], kind: Literal["text", "pairs"]) -> list[FilePlan]:
    """Resolve every source to its files and check the columns on the first record: fail before any work."""
    if not sources:
        raise DataError("no sources configured")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"source names must be unique, got {names}")
    plans = []
    for source in sources:
        fmt = detect_format(source)
        if kind == "pairs" and fmt == "text":
            raise DataError(f"source {source.name}: pairs need jsonl, parquet or HF input, not plain text")
        if kind == "pairs":
            from nomicbert.config import TASK_PREFIXES

            for side in (source.query_prefix, source.document_prefix):
                if side not in TASK_PREFIXES:
                    raise DataError(f"source {source.name}: prefix {side!r} is not one of {sorted(TASK_PREFIXES)}")
        cols = wanted_columns(source, kind)
        if fmt == "hf":
            ds = _load_hf(source)
            _check_columns(source, cols, list(ds.column_names), f"Hugging Face dataset {source.path}")
            files, fmt = [f["filename"] for f in ds.cache_files], "arrow"
        else:
            suffixes = {"text": TEXT_SUFFIXES, "jsonl": JSONL_SUFFIXES, "parquet": (".parquet",),
                        "arrow": (".arrow",)}[fmt]  # fmt: skip
            files = io.list_files(source.path, suffixes)
            if fmt == "jsonl":
                _check_columns(source, cols, _first_json_keys(files[0]), files[0])
            elif fmt in ("parquet", "arrow"):
                _check_columns(source, cols, _schema_names(files[0], fmt), files[0])
        for i, f in enumerate(files):
            digest = hashlib.sha1(f.encode()).hexdigest()[:8]
            plans.append(FilePlan(source.name, f, fmt, f"{source.name}-{i:05d}-{digest}", len(plans)))
    return plans


def _check_columns(source: SourceConfig, cols: dict[str, str], available: list[str], where: str) -> None:
    missing = [c for c in cols.values() if c not in available]
    if missing:
        raise DataError(f"source {source.name}: column(s) {missing} not found in {where}; it has {available}")


def _first_json_keys(file: str) -> list[str]:
    for _, raw in _iter_lines(file):
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict):
            return list(record)
    raise DataError(f"{file} holds no valid JSON object line")


def _schema_names(file: str, fmt: str) -> list[str]:
    fs, path = io.resolve(file)
    if fmt == "parquet":
        return pq.ParquetFile(path, filesystem=fs).schema_arrow.names
    with fs.open_input_file(path) as f:
        return pa.ipc.open_stream(f).schema.names


def _iter_lines(file: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the newline), streaming; gzip/zstd decided by the suffix."""
    fs, path = io.resolve(file)
    leftover, number = b"", 0
    with fs.open_input_stream(path, compression="detect") as stream:
        while chunk := stream.read(READ_BYTES):
            lines = (leftover + chunk).split(b"\n")
            leftover = lines.pop()
            for line in lines:
                number += 1
                yield number, line.removesuffix(b"\r")
    if leftover:
        yield number + 1, leftover.removesuffix(b"\r")


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), False


def _text_records(file: str, doc_split: str) -> Iterator[Record]:
    """Yield (line, record, reason, preview) per document of a plain-text file."""
    if doc_split == "file":
        lines = list(_iter_lines(file))
        decoded = [_decode(raw) for _, raw in lines]
        text = "\n".join(t for t, _ in decoded)
        ok = all(good for _, good in decoded)
        yield 1, {"text": text}, None if ok else "not_utf8", text[:PREVIEW_CHARS]
        return
    if doc_split == "line":
        for number, raw in _iter_lines(file):
            text, ok = _decode(raw)
            yield number, {"text": text}, None if ok else "not_utf8", text[:PREVIEW_CHARS]
        return
    block: list[str] = []
    start, ok = 0, True
    for number, raw in _iter_lines(file):
        text, good = _decode(raw)
        if text.strip():
            if not block:
                start, ok = number, True
            block.append(text)
            ok = ok and good
        elif block:
            doc = "\n".join(block)
            yield start, {"text": doc}, None if ok else "not_utf8", doc[:PREVIEW_CHARS]
            block = []
    if block:
        doc = "\n".join(block)
        yield start, {"text": doc}, None if ok else "not_utf8", doc[:PREVIEW_CHARS]


def _json_records(file: str) -> Iterator[Record]:
    for number, raw in _iter_lines(file):
        text, ok = _decode(raw)
        if not ok:
            yield number, None, "not_utf8", text[:PREVIEW_CHARS]
            continue
        if not text.strip():
            yield number, None, "empty", ""
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            yield number, None, "malformed_json", text[:PREVIEW_CHARS]
            continue
        if not isinstance(record, dict):
            yield number, None, "malformed_json", text[:PREVIEW_CHARS]
            continue
        yield number, record, None, ""


def _table_records(file: str, fmt: str, columns: list[str]) -> Iterator[Record]:
    fs, path = io.resolve(file)
    row = 0
    if fmt == "parquet":
        pf = pq.ParquetFile(path, filesystem=fs)
        present = [c for c in columns if c in pf.schema_arrow.names]
        batches = pf.iter_batches(batch_size=8192, columns=present)
        for batch in batches:
            for record in batch.to_pylist():
                yield row, record, None, ""
                row += 1
        return
    with fs.open_input_file(path) as f:
        reader = pa.ipc.open_stream(f)
        for batch in reader:
            batch = batch.select([c for c in columns if c in batch.schema.names])
            for record in batch.to_pylist():
                yield row, record, None, ""
                row += 1


NEGATIVE_REASONS = ("empty", "duplicate", "equals_query_or_document")


def clean_negatives(items: list[str], query: str | None, document: str | None) -> tuple[list[str], Counter]:
    """A row's negatives without empty texts, repeats, and copies of its own query or document (a false
    negative), in order; and how many of each were removed."""
    kept: dict[str, None] = {}
    removed: Counter = Counter()
    for item in items:
        if not item.strip():
            removed["empty"] += 1
        elif item in (query, document):
            removed["equals_query_or_document"] += 1
        elif item in kept:
            removed["duplicate"] += 1
        else:
            kept[item] = None
    return list(kept), removed


def _validate(record: dict[str, Any], cols: dict[str, str], max_chars: int,
              negatives_dropped: Counter | None = None) -> tuple[dict[str, Any] | None, str | None]:  # fmt: skip
    """Raw record -> (row of output fields, None) or (None, reason). Items removed from the negatives of a kept
    row are counted into ``negatives_dropped`` by reason."""
    out: dict[str, Any] = {}
    removed: Counter = Counter()
    for field, column in cols.items():
        value = record.get(column)
        if value is None:
            return None, "missing_column"
        if field == "negatives":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
                return None, "not_text"
            items, removed = clean_negatives(list(items), out.get("query"), out.get("document"))
            if not items:
                return None, "empty"
            if any(len(v) > max_chars for v in items):
                return None, "too_long"
            out[field] = items
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return None, "not_text"
        if not value.strip():
            return None, "empty"
        if len(value) > max_chars:
            return None, "too_long"
        out[field] = value
    if negatives_dropped is not None:
        negatives_dropped.update(removed)
    return out, None


def _schema(cols: dict[str, str]) -> pa.Schema:
    fields = [pa.field("source", pa.string()), pa.field("file", pa.string()), pa.field("line", pa.int64()),
              pa.field("key", pa.int64())]  # fmt: skip
    fields += [pa.field(f, pa.list_(pa.string()) if f == "negatives" else pa.string()) for f in cols]
    return pa.schema(fields)


class ReadFiles:
    """``map_batches`` callable: a batch of file plans -> streamed blocks of valid rows (one task per file)."""

    def __init__(self, sources: dict[str, dict[str, Any]], kind: Literal["text", "pairs"], output: str,
                 max_chars: int, rows_per_block: int = 4096) -> None:  # fmt: skip
        self.sources = {name: SourceConfig(**cfg) for name, cfg in sources.items()}
        self.kind, self.output, self.max_chars, self.rows_per_block = kind, output, max_chars, rows_per_block

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for source, file, fmt, key, seq in zip(batch["source"], batch["file"], batch["format"], batch["key"],
                                               batch["seq"], strict=True):  # fmt: skip
            yield from self.read_file(FilePlan(str(source), str(file), str(fmt), str(key), int(seq)))

    def read_file(self, plan: FilePlan) -> Iterator[pa.Table]:
        source = self.sources[plan.source]
        cols = wanted_columns(source, self.kind)
        schema = _schema(cols)
        if plan.format == "text":
            records = _text_records(plan.file, source.doc_split)
        elif plan.format == "jsonl":
            records = _json_records(plan.file)
        else:
            records = _table_records(plan.file, plan.format, list(cols.values()))
        where = "row" if plan.format in ("parquet", "arrow") else "line"
        rows: list[dict[str, Any]] = []
        bad: list[dict[str, Any]] = []
        rows_in = rows_ok = 0
        negatives_dropped: Counter = Counter()
        for line, record, reason, preview in records:
            if source.max_rows_per_file is not None and rows_in >= source.max_rows_per_file:
                break
            rows_in += 1
            if reason is None:
                row, reason = _validate(record, cols, self.max_chars, negatives_dropped)
                if reason is not None:
                    preview = json.dumps(record, ensure_ascii=False, default=str)[:PREVIEW_CHARS]
            if reason is not None:
                bad.append({"source": plan.source, "file": plan.file, where: line, "reason": reason, "text": preview})
                continue
            rows_ok += 1
            rows.append({"source": plan.source, "file": plan.file, "line": line, "key": (plan.seq << KEY_SHIFT) | line,
                         **row})  # fmt: skip
            if len(rows) >= self.rows_per_block:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=schema)
        io.record_file_stats(self.output, plan.key, plan.source, rows_in, rows_ok, bad, dict(negatives_dropped))


def read_sources(sources: list[SourceConfig], kind: Literal["text", "pairs"], output: str, max_chars: int,
                 num_cpus: float = 1.0, plans: list[FilePlan] | None = None,
                 resources: dict[str, float] | None = None):  # fmt: skip
    """Lazy Ray dataset of valid rows of all sources (file order kept when the context preserves order); each read
    task asks ``resources`` too (e.g. ``{data_node: 1}``: the data node type of cluster.yaml)."""
    import ray

    plans = plans if plans is not None else preflight(sources, kind)
    items = [dataclasses.asdict(p) for p in plans]
    reader = ReadFiles({s.name: dataclasses.asdict(s) for s in sources}, kind, output, max_chars)
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        reader, batch_size=1, batch_format="numpy", num_cpus=num_cpus, resources=resources or {})
