"""ops MLM path on the real corpus with a real local Ray: read -> tokenize -> pack -> mlm-data/, masking and
quarantine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ops import io
from ops.config import load_config
from ops.io import DataError
from ops.mask import IGNORE_INDEX, MASK_ID, VOCAB_SIZE, MaskTokens
from ops.mlm_data import MlmDataConfig, run
from ops.pack import pack_arrays
from ops.readers import SourceConfig, preflight

WIKI_DOCS, WIKITEXT_LINES = 250, 150


def wiki_articles(shared_data: Path, n: int) -> list[str]:
    """The first n blank-line separated articles, split here independently of ops.readers."""
    text = (shared_data / "mlm_corpus" / "wikipedia_en_sample.txt").read_text(encoding="utf-8")
    return [block.strip("\n") for block in text.split("\n\n") if block.strip()][:n]


def wikitext_lines(shared_data: Path, n: int) -> list[str]:
    raw = (shared_data / "mlm_corpus" / "wikitext2_raw" / "wiki.test.raw").read_bytes().decode("utf-8")
    return [line.removesuffix("\r") for line in raw.split("\n")][:n]


@pytest.fixture(scope="module")
def mlm_data(ray_session, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm") / "mlm-data"
    config = load_config(MlmDataConfig, raw={
        "output": str(out), "row_length": 2048, "docs_per_pack": 1000, "num_cpus": 0.5,
        "sources": [
            {"name": "wikipedia", "path": str(shared_data / "mlm_corpus" / "wikipedia_en_sample.txt"),
             "format": "text", "doc_split": "blank_line", "max_rows_per_file": WIKI_DOCS},
            {"name": "wikitext", "path": str(shared_data / "mlm_corpus" / "wikitext2_raw" / "wiki.test.raw"),
             "doc_split": "line", "max_rows_per_file": WIKITEXT_LINES}]})  # fmt: skip
    manifest = run(config)
    table = pq.read_table(sorted(out.glob("part-*.parquet"))).sort_by("row_id")
    return out, manifest, table


def test_packed_rows_are_the_documents_in_order(mlm_data, shared_data):
    out, manifest, table = mlm_data
    from nomicbert.tokenizer import load_tokenizer

    docs = wiki_articles(shared_data, WIKI_DOCS) + wikitext_lines(shared_data, WIKITEXT_LINES)
    encoded = load_tokenizer()(docs, add_special_tokens=True)["input_ids"]  # the HF call path, not ops'
    stream = np.concatenate([np.asarray(ids) for ids in encoded])
    rows = len(stream) // 2048
    assert table.num_rows == rows == manifest["rows_out"] > 40
    assert table.column("row_id").to_pylist() == list(range(rows))
    ids = table.column("input_ids").to_pylist()
    assert {len(r) for r in ids} == {2048}
    packed = np.concatenate([np.asarray(r) for r in ids])
    np.testing.assert_array_equal(packed, stream[: rows * 2048])  # only the remainder (< 2048) is missing
    special = np.concatenate([np.asarray(r) for r in table.column("special_tokens_mask").to_pylist()])
    np.testing.assert_array_equal(special.astype(bool), np.isin(packed, [101, 102]))
    # document pieces: every row sums to 2048 and the cuts are exactly document ends and row ends
    doc_lengths = table.column("doc_lengths").to_pylist()
    assert all(sum(d) == 2048 for d in doc_lengths)
    cuts = np.cumsum(np.concatenate([np.asarray(d) for d in doc_lengths]))
    doc_ends = np.cumsum([len(e) for e in encoded])
    expected = np.union1d(doc_ends[doc_ends <= rows * 2048], np.arange(2048, rows * 2048 + 1, 2048))
    np.testing.assert_array_equal(cuts, expected)
    # the manifest accounts for every document and every dropped token
    assert manifest["rows_in"] == len(docs) and manifest["dropped_by_reason"] == {}
    assert manifest["rows_per_source"] == {"wikipedia": WIKI_DOCS, "wikitext": WIKITEXT_LINES}
    assert manifest["packing"]["tokens_in"] == len(stream)
    assert manifest["packing"]["tokens_dropped_remainder"] == len(stream) - rows * 2048
    assert manifest["tokenizer"]["vocab_size"] == 30522 and manifest["config_fingerprint"]
    assert table.schema.field("input_ids").type.value_type.bit_width == 32
    assert not (out / "_stats").exists() and not (out / "_parts").exists()
    assert json.loads((out / "manifest.json").read_text())["rows_out"] == rows


def test_pack_rule_drops_each_batch_remainder():
    """Several packing batches: each keeps floor(tokens / row_length) rows of its own documents."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 300, size=40)
    ids = rng.integers(1000, 30000, size=int(lengths.sum())).astype(np.int32)
    special = np.zeros_like(ids, dtype=np.int8)
    kept, kept_special, pieces, per_row = pack_arrays(ids, special, lengths, 256)
    assert len(kept) == (lengths.sum() // 256) * 256 and len(per_row) == lengths.sum() // 256
    np.testing.assert_array_equal(kept, ids[: len(kept)])
    assert pieces.sum() == len(kept) and per_row.sum() == len(pieces)
    with pytest.raises(ValueError, match="row_length"):
        pack_arrays(ids, special, lengths, 1)


def test_masking_statistics_and_determinism(mlm_data, ray_session):
    out, _, table = mlm_data
    import ray

    ds = ray.data.read_parquet(str(out), file_extensions=["parquet"])
    masked = ds.map_batches(MaskTokens(0.3, seed=7, epoch=0), batch_size=16, batch_format="numpy")
    rows = sorted(masked.take_all(), key=lambda r: r["row_id"])
    original = {r["row_id"]: np.asarray(r["input_ids"]) for r in table.to_pylist()}
    special = {r["row_id"]: np.asarray(r["special_tokens_mask"]) for r in table.to_pylist()}
    chosen = total = to_mask = to_random = unchanged = 0
    for r in rows:
        ids, labels, orig, spec = np.asarray(r["input_ids"]), r["labels"], original[r["row_id"]], special[r["row_id"]]
        sel = labels != IGNORE_INDEX
        assert not (sel & (spec == 1)).any()  # special tokens never chosen
        np.testing.assert_array_equal(labels[sel], orig[sel])
        np.testing.assert_array_equal(ids[~sel], orig[~sel])
        chosen, total = chosen + sel.sum(), total + (spec == 0).sum()
        to_mask += (ids[sel] == MASK_ID).sum()
        unchanged += (ids[sel] == orig[sel]).sum()
        to_random += ((ids[sel] != MASK_ID) & (ids[sel] != orig[sel])).sum()
        assert ids.max() < VOCAB_SIZE
    assert abs(chosen / total - 0.30) < 0.005, chosen / total
    assert abs(to_mask / chosen - 0.80) < 0.01 and abs(to_random / chosen - 0.10) < 0.01
    assert abs(unchanged / chosen - 0.10) < 0.01
    # the same (seed, row_id, epoch) gives the same mask whatever the batching; another epoch changes it
    one = table.slice(3, 1).to_pylist()[0]
    batch = {k: np.asarray([one[k]]) for k in ("input_ids", "special_tokens_mask", "row_id")}
    again = MaskTokens(0.3, seed=7, epoch=0)(batch)
    same_row = next(r for r in rows if r["row_id"] == one["row_id"])
    np.testing.assert_array_equal(again["input_ids"][0], same_row["input_ids"])
    other = MaskTokens(0.3, seed=7, epoch=1)(batch)
    assert (other["labels"] != again["labels"]).any()
    with pytest.raises(ValueError, match="mlm_probability"):
        MaskTokens(1.5)


BAD_ROWS = {
    "empty": [b'{"text": ""}', b'{"text": "   \\t  "}'],
    "not_utf8": [b'{"text": "caf\xe9 au lait"}'],
    "malformed_json": [b'{"text": "unterminated', b'["a list", "not an object"]'],
    "missing_column": [b'{"body": "the text is under another key"}', b'{"text": null}'],
    "not_text": [b'{"text": {"nested": "object"}}'],
    "too_long": [json.dumps({"text": "word " * 2000}).encode()],
}


def test_quarantine_catches_each_planted_bad_row(ray_session, shared_data, tmp_path):
    articles = [a for a in wiki_articles(shared_data, 80) if len(a) < 4000][:12]  # under max_doc_chars
    good = [json.dumps({"text": t}).encode() for t in articles]
    lines, expected = list(good[:6]), {}
    for reason, rows in BAD_ROWS.items():
        for row in rows:
            lines.append(row)
            expected[len(lines)] = reason  # 1-based line number
    lines += good[6:]
    src = tmp_path / "planted.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    manifest = run(load_config(MlmDataConfig, raw={
        "output": str(out), "row_length": 128, "max_doc_chars": 5000, "num_cpus": 0.5,
        "sources": [{"name": "planted", "path": str(src), "text_column": "text"}]}))  # fmt: skip
    counts = {reason: len(rows) for reason, rows in BAD_ROWS.items()}
    assert manifest["dropped_by_reason"] == counts
    assert manifest["rows_in"] == len(lines) and manifest["rows_per_source"] == {"planted": len(good)}
    quarantined = io.read_quarantine(str(out))
    assert {q["line"]: q["reason"] for q in quarantined} == expected
    assert all(q["file"] == str(src) and q["source"] == "planted" for q in quarantined)
    assert manifest["rows_out"] > 0


def test_wrong_path_or_column_fails_before_any_work(shared_data, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        preflight([SourceConfig(name="x", path=str(tmp_path / "missing.txt"), format="text")], "text")
    pairs = str(shared_data / "pairs" / "stackexchange_pairs.jsonl")
    with pytest.raises(DataError, match=r"\['querry'\] not found"):
        preflight([SourceConfig(name="se", path=pairs, query_column="querry")], "pairs")
    with pytest.raises(DataError, match="prefix"):
        preflight([SourceConfig(name="se", path=pairs, query_prefix="search")], "pairs")
    out = tmp_path / "never-created"
    with pytest.raises(DataError, match="text"):
        run(load_config(MlmDataConfig, raw={"output": str(out), "sources": [{"name": "se", "path": pairs}]}))
    assert not out.exists()
