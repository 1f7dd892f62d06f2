"""ops readers on real pair data re-saved as parquet, gzip jsonl and a Hugging Face ``save_to_disk`` folder."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ops import io
from ops.io import DataError
from ops.readers import ReadFiles, SourceConfig, detect_format, preflight


def real_pairs(shared_data: Path, n: int) -> list[dict]:
    lines = (shared_data / "pairs" / "stackexchange_pairs.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def read_all(source: SourceConfig, output: Path) -> list[dict]:
    """The reader operator itself, as one Ray task would run it, over every file of the source."""
    reader = ReadFiles({source.name: source.__dict__}, "pairs", str(output), max_chars=100_000)
    rows = []
    for plan in preflight([source], "pairs"):
        for block in reader.read_file(plan):
            rows += block.to_pylist()
    return rows


def test_parquet_rows_and_locations(shared_data, tmp_path):
    records = real_pairs(shared_data, 40)
    records[5]["document"] = None  # a null cell
    records[9]["query"] = "  "
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "se.parquet", row_group_size=16)
    source = SourceConfig(name="se", path=str(tmp_path / "se.parquet"))
    assert detect_format(source) == "parquet"
    rows = read_all(source, tmp_path / "out")
    assert len(rows) == 38 and rows[0]["query"] == records[0]["query"]
    quarantined = {q["row"]: q["reason"] for q in io.read_quarantine(str(tmp_path / "out"))}
    assert quarantined == {5: "missing_column", 9: "empty"}
    assert io.sum_stats(io.collect_stats(str(tmp_path / "out")))["rows_in"] == 40


def test_gzip_jsonl_folder_and_glob(shared_data, tmp_path):
    records = real_pairs(shared_data, 30)
    for i in range(3):
        with gzip.open(tmp_path / f"shard-{i:05d}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records[i * 10:(i + 1) * 10])
    rows = read_all(SourceConfig(name="se", path=str(tmp_path / "shard-*.jsonl.gz")), tmp_path / "out")
    assert [r["query"] for r in rows] == [r["query"] for r in records]
    assert {r["line"] for r in rows} == set(range(1, 11))
    with pytest.raises(DataError, match="no input files"):
        preflight([SourceConfig(name="se", path=str(tmp_path / "nothing-*.jsonl"))], "pairs")


def test_hugging_face_saved_folder(shared_data, tmp_path):
    import datasets

    records = real_pairs(shared_data, 25)
    datasets.Dataset.from_list(records).shuffle(seed=0).save_to_disk(str(tmp_path / "hf"))
    source = SourceConfig(name="se", path=str(tmp_path / "hf"))
    assert detect_format(source) == "hf"
    rows = read_all(source, tmp_path / "out")
    assert sorted(r["query"] for r in rows) == sorted(r["query"] for r in records)
    with pytest.raises(DataError, match="querry"):
        preflight([SourceConfig(name="se", path=str(tmp_path / "hf"), query_column="querry")], "pairs")
