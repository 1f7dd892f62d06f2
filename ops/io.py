"""Files on any pyarrow filesystem (local, ``s3://``, ``gs://``) and the dataset-folder contract.

Every job writes ``part-*.parquet`` + ``manifest.json`` + ``quarantine/``. Readers leave per-file statistics in
``_stats/`` and bad rows in ``quarantine/`` under deterministic names (a retried task overwrites its own files),
so one streaming pass both produces the data and accounts for every row; `finalize` then numbers the rows,
sums the statistics into the manifest and removes the scratch folders.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATS_DIR = "_stats"
TMP_DIR = "_parts"
QUARANTINE_DIR = "quarantine"


class DataError(ValueError):
    """Input that cannot be read as configured (wrong path, wrong column, no files); raised before any work."""


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """``s3://b/k`` / ``gs://b/k`` / local path -> (filesystem, path inside it); local paths become absolute."""
    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    local = path.removeprefix("file://")
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_remote(base) else str(Path(base, *parts))


def absolute(path: str) -> str:
    """A URI as given; a local path made absolute (jobs hand it to processes with another working directory)."""
    return path if is_remote(path) else str(Path(path.removeprefix("file://")).expanduser().resolve())


def cache_root() -> Path:
    """Where remote folders are copied for libraries that read local files only (model loaders, evaluation sets)."""
    return Path(os.environ.get("NOMIC_EMBED_CACHE", Path.home() / ".cache" / "nomic-embed-ray"))


def local_copy(path: str) -> str:
    """A local path for ``path``: itself when local; for a remote file or folder, a copy in `cache_root`, kept
    while the remote listing (names, sizes, modification times) is unchanged, so every process on a node
    downloads a checkpoint once and a rewritten one is fetched again."""
    if not is_remote(path):
        return path.removeprefix("file://")
    fs, remote = resolve(path)
    info = fs.get_file_info(remote)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path} does not exist")
    listing = [info] if info.type == pafs.FileType.File else \
        sorted(fs.get_file_info(pafs.FileSelector(remote, recursive=True)), key=lambda i: i.path)  # fmt: skip
    signature = hashlib.sha256(json.dumps([path] + [[i.path, i.size, str(i.mtime)] for i in listing]).encode())
    target = cache_root() / signature.hexdigest()[:24] / posixpath.basename(remote.rstrip("/"))
    if (target.parent / ".complete").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        pafs.copy_files(remote, str(staging / target.name), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem(), use_threads=True)  # a file or a whole folder
        if not target.exists():  # another process of this node may have finished the same copy first
            os.replace(staging / target.name, target)
        (target.parent / ".complete").touch()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def upload_folder(local: str | Path, path: str) -> str:
    """Replace the folder ``path`` (local or remote) by the contents of the local folder ``local``."""
    fs, dest = resolve(path)
    if fs.get_file_info(dest).type == pafs.FileType.Directory:
        fs.delete_dir_contents(dest)
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    use_threads=True)  # fmt: skip
    return path


def list_files(pattern: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """A file, a folder (recursive, hidden files skipped) or a glob in the last path part -> sorted file URIs."""
    fs, path = resolve(pattern)
    prefix = pattern.split("://", 1)[0] + "://" if is_remote(pattern) else ""
    parent, name = posixpath.split(path)
    if any(ch in name for ch in "*?["):
        infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        found = [i.path for i in infos
                 if i.type == pafs.FileType.File and fnmatch.fnmatch(posixpath.basename(i.path), name)]  # fmt: skip
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"input path {pattern} does not exist")
        if info.type == pafs.FileType.File:
            return [prefix + path]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        hidden = [any(p.startswith((".", "_")) for p in posixpath.relpath(i.path, path).split("/")) for i in infos]
        found = [i.path for i, skip in zip(infos, hidden, strict=True) if i.type == pafs.FileType.File and not skip]
        if suffixes:
            found = [f for f in found if f.endswith(suffixes)]
    if not found:
        looked = f" (looked for {', '.join(suffixes)})" if suffixes else ""
        raise DataError(f"no input files match {pattern}{looked}")
    return [prefix + f for f in sorted(found)]


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def prepare_output(output: str, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless asked to replace it."""
    fs, path = resolve(output)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise DataError(f"output {output} is a file, expected a folder")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path)):
        if not overwrite:
            raise DataError(f"output folder {output} is not empty; pass overwrite=true to replace it")
        fs.delete_dir_contents(path)
    fs.create_dir(path, recursive=True)


def write_text(path: str, text: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as out:
        out.write(text.encode())


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def record_file_stats(output: str, key: str, source: str, rows_in: int, rows_ok: int, bad: list[dict[str, Any]],
                      negatives_dropped: dict[str, int] | None = None) -> None:  # fmt: skip
    """Called by a reader when it finishes one input file: the accounting that ends up in the manifest.
    ``negatives_dropped``: items removed from the negatives lists of kept rows, by reason."""
    if bad:
        write_jsonl(join(output, QUARANTINE_DIR, f"{key}.jsonl"), bad)
    stats = {"source": source, "rows_in": rows_in, "rows_ok": rows_ok,
             "dropped_by_reason": dict(Counter(r["reason"] for r in bad)),
             "negatives_dropped_by_reason": dict(negatives_dropped or {})}  # fmt: skip
    write_text(join(output, STATS_DIR, f"{key}.json"), json.dumps(stats))


def collect_stats(output: str) -> list[dict[str, Any]]:
    fs, p = resolve(join(output, STATS_DIR))
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(p)) if i.path.endswith(".json"))
    out = []
    for f in files:
        with fs.open_input_stream(f) as stream:
            out.append(json.loads(stream.read()))
    return out


def sum_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-file reader statistics -> rows_in, rows read fine per source, dropped by reason (and per source),
    negatives removed from kept rows by reason."""
    rows_in, ok, dropped, dropped_per_source, negatives = 0, Counter(), Counter(), {}, Counter()
    for s in stats:
        rows_in += s["rows_in"]
        ok[s["source"]] += s["rows_ok"]
        dropped.update(s["dropped_by_reason"])
        dropped_per_source.setdefault(s["source"], Counter()).update(s["dropped_by_reason"])
        negatives.update(s.get("negatives_dropped_by_reason", {}))
    return {"rows_in": rows_in, "rows_read_per_source": dict(ok), "dropped_by_reason": dict(dropped),
            "dropped_per_source": {k: dict(v) for k, v in dropped_per_source.items()},
            "negatives_dropped_by_reason": dict(negatives)}  # fmt: skip


def add_dropped(stats: dict[str, Any], reason: str, per_source: dict[str, int]) -> dict[str, Any]:
    """`sum_stats` + rows a later step dropped (``per_source``: source -> rows) under ``reason``."""
    dropped = {**stats["dropped_by_reason"], reason: sum(per_source.values())}
    by_source = {s: dict(d) for s, d in stats["dropped_per_source"].items()}
    for source, n in per_source.items():
        by_source.setdefault(source, {})[reason] = n
    return {**stats, "dropped_by_reason": dropped, "dropped_per_source": by_source}


def write_parts(ds, output: str, name: str, input_files: int) -> None:
    """Write a Ray dataset into the scratch folder (`finalize` renames and numbers the rows), with a progress line
    every 30 s: input files read (their readers' statistics are in) of ``input_files``, rows written so far."""
    from ops.console import Progress

    stop = threading.Event()
    progress = Progress(name, input_files, "input files read", logging.getLogger("ops"))
    watcher = threading.Thread(target=_watch_parts, args=(output, progress, stop), daemon=True)
    watcher.start()
    try:
        ds.write_parquet(join(output, TMP_DIR))
    finally:
        stop.set()
        watcher.join()


def _watch_parts(output: str, progress: Any, stop: threading.Event) -> None:
    rows: dict[str, int] = {}  # part file -> rows (a written part does not change)
    while not stop.wait(5.0):
        fs, parts = resolve(join(output, TMP_DIR))
        for info in fs.get_file_info(pafs.FileSelector(parts, allow_not_found=True)):
            if info.path.endswith(".parquet") and info.path not in rows:
                try:
                    rows[info.path] = pq.ParquetFile(info.path, filesystem=fs).metadata.num_rows
                except (pa.ArrowInvalid, OSError):  # still being written (no footer yet): counted next time
                    continue
        fs, stats = resolve(join(output, STATS_DIR))
        read = sum(1 for _ in fs.get_file_info(pafs.FileSelector(stats, allow_not_found=True)))
        progress.update(read, f"{sum(rows.values())} rows written so far")


def _number_part(src: str, dst: str, offset: int) -> None:
    fs, p = resolve(src)
    table = pq.read_table(p, filesystem=fs)
    ids = pa.array(range(offset, offset + table.num_rows), type=pa.int64())
    table = table.add_column(0, "row_id", ids)
    dfs, dp = resolve(dst)
    pq.write_table(table, dp, filesystem=dfs)


def finalize(output: str, num_cpus: float = 0.25) -> int:
    """``_parts/*.parquet`` -> ``part-NNNNN.parquet`` with a contiguous int64 ``row_id`` (0..N-1, file order)."""
    import ray

    fs, tmp = resolve(join(output, TMP_DIR))
    if fs.get_file_info(tmp).type == pafs.FileType.NotFound:
        files = []
    else:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(tmp)) if i.path.endswith(".parquet"))
    prefix = output.split("://", 1)[0] + "://" if is_remote(output) else ""
    counts = [pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files]
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    task = ray.remote(num_cpus=num_cpus)(_number_part)
    ray.get([task.remote(prefix + f, join(output, f"part-{i:05d}.parquet"), off)
             for i, (f, off) in enumerate(zip(files, offsets, strict=True)) if counts[i]])  # fmt: skip
    if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
        fs.delete_dir(tmp)
    return sum(counts)


def drop_scratch(output: str) -> None:
    fs, p = resolve(join(output, STATS_DIR))
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir(p)


def code_version() -> str:
    """The git commit of the code that wrote the data ("+dirty" when the tree has changes), or "unknown"."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_manifest(output: str, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = {**manifest, "code_version": code_version(),
                "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}  # fmt: skip
    write_text(join(output, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


def read_manifest(output: str) -> dict[str, Any]:
    return json.loads(read_text(join(output, "manifest.json")))


def read_quarantine(output: str) -> list[dict[str, Any]]:
    """All quarantined rows of a finished dataset folder (small by construction)."""
    fs, p = resolve(join(output, QUARANTINE_DIR))
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    rows = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(p)), key=lambda i: i.path):
        with fs.open_input_stream(info.path) as f:
            rows += [json.loads(line) for line in f.read().decode().splitlines() if line]
    return rows
