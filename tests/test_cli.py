"""`python -m nomicbert embed` and its readers on bad input: every run embeds one row per text or ends with one
named ``file:line`` error (exit code 2, no traceback, no output file); checks come before the model loads."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from time_limit import time_limit

import nomicbert.__main__ as cli
from nomicbert.checkpoint import save_pretrained
from nomicbert.config import tiny
from nomicbert.embed import Embedder
from nomicbert.model import NomicBertModel
from nomicbert.texts import InputError, read_texts
from nomicbert.tokenizer import load_tokenizer

PROJECT = Path(__file__).resolve().parent.parent
ERROR = "python -m nomicbert embed: error: "
TEXTS = ["the quick brown fox", "rotary positions extend to long context", "a"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A v1.5 model 128 wide: trained dims (128, 64)."""
    torch.manual_seed(0)
    config = tiny(hidden_size=128, embedding_recipe="v1.5", max_trained_positions=512)
    return save_pretrained(NomicBertModel(config), tmp_path_factory.mktemp("cli") / "model", load_tokenizer())


@pytest.fixture(scope="module")
def reference(model_dir) -> Embedder:
    return Embedder.from_pretrained(model_dir, device="cpu")


def run_cli(args: list[str]) -> int:
    """main() in this process; the exit code (0 when it returns)."""
    try:
        cli.main(["embed", *args, "--device", "cpu"])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "warning:" not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(ERROR), stderr
    return lines[0][len(ERROR) :]


def test_every_format_embeds_the_texts(model_dir, reference, tmp_path, monkeypatch, capsys):
    """.json with one object, .json lists, .jsonl (objects or strings, blank lines), .txt (CRLF, BOM), gzip by
    content, stdin: the rows are the texts' embeddings, in order."""
    want = reference.encode(TEXTS, task="search_query")
    objects = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    files = {
        "list.json": json.dumps(objects, indent=2).encode(),
        "strings.json": json.dumps(TEXTS).encode(),
        "lines.jsonl": ("\n".join(json.dumps(o) for o in objects[:2]) + "\n\n" + json.dumps(TEXTS[2]) + "\n").encode(),
        "records.json": "\n".join(json.dumps(o) for o in objects).encode(),  # datasets' to_json writes these
        "crlf.txt": b"\xef\xbb\xbf" + "\r\n".join(TEXTS).encode() + b"\r\n",
        "list.json.gz": gzip.compress(json.dumps(TEXTS).encode()),
        "no_suffix": gzip.compress("\n".join(json.dumps(o) for o in objects).encode()),
    }
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        assert run_cli(["--model", str(model_dir), "--input", str(tmp_path / name), "--output",
                        str(tmp_path / f"{name}.npy"), "--task", "search_query"]) == 0, name  # fmt: skip
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), want, atol=1e-6, err_msg=name)
    # one object in a .json file is one text (not the literal line)
    (tmp_path / "ok.json").write_text('{"text": "a"}')
    assert run_cli(["--model", str(model_dir), "--input", str(tmp_path / "ok.json"), "--output",
                    str(tmp_path / "one.npy")]) == 0  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "one.npy"), reference.encode(["a"]), atol=1e-6)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(TEXTS).encode())))
    assert run_cli(["--model", str(model_dir), "--input", "-", "--output", str(tmp_path / "stdin.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "stdin.npy"), reference.encode(TEXTS), atol=1e-6)
    assert "wrote 3 x 128 float32 embeddings" in capsys.readouterr().err


def test_non_utf8_gives_file_line_and_exit_code_2(model_dir, tmp_path):
    """The real command: one line naming file:line, exit code 2, no traceback, no output file."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"first\nsecond\nthi\xe9rd\n")
    out = tmp_path / "out.npy"
    proc = subprocess.run([sys.executable, "-m", "nomicbert", "embed", "--model", str(model_dir), "--input", str(bad),
                           "--output", str(out)], capture_output=True, text=True, cwd=PROJECT, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == f"{bad}:3: not valid UTF-8 (byte 0xe9 at column 4)"
    assert not out.exists()


def test_dim_out_of_range_fails_fast_without_loading_weights(model_dir, tmp_path):
    """A folder with config.json and no weights: --dim 1000 is refused before any weight (or torch) is needed."""
    folder = tmp_path / "config_only"
    folder.mkdir()
    (folder / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    args = ["embed", "--model", str(folder), "--input", str(tmp_path / "texts.txt"), "--output", str(tmp_path / "o.npy")]
    script = ("import sys\nfrom nomicbert.__main__ import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    print('exit', e.code, 'torch' in sys.modules)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script, *args, "--dim", "1000"], capture_output=True, text=True,
                          cwd=PROJECT, timeout=120, check=False)  # fmt: skip
    assert proc.stdout.strip() == "exit 2 False"  # refused, and torch was never imported
    assert one_error_line(proc.stderr) == f"--dim 1000: embedding dim 1000 is outside 64..128, the dims {folder} can give"
    start = time.perf_counter()
    assert run_cli(args[1:] + ["--dim", "1000"]) == 2
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "o.npy").exists()
    with pytest.raises(ValueError, match="outside 64..128"):  # the Python API checks the same range
        Embedder(NomicBertModel(tiny(hidden_size=128)), load_tokenizer()).encode(["x"], dim=32)


def test_dim_warning_output_path_and_progress(model_dir, reference, tmp_path, monkeypatch, capsys):
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS * 3))
    monkeypatch.setattr(cli, "LONG_INPUT", 5)  # a "long" input, so progress shows on a non-interactive stderr
    monkeypatch.setattr(cli, "REPORT_EVERY_S", 0.0)
    assert run_cli(["--model", str(model_dir), "--input", str(tmp_path / "texts.txt"), "--output",
                    str(tmp_path / "noext"), "--dim", "65", "--batch-size", "4"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: --dim 65 is not one of the model's trained Matryoshka dims [128, 64]" in err
    assert f"to {tmp_path / 'noext'}\n" in err and not (tmp_path / "noext.npy").exists()
    vectors = np.load(tmp_path / "noext")
    assert vectors.shape == (9, 65)
    np.testing.assert_allclose(vectors, reference.encode(TEXTS * 3, dim=65), atol=1e-6)
    progress = [line for line in err.splitlines() if line.startswith("embedded ")]
    assert [line.split(",")[0] for line in progress] == ["embedded 4/9 texts", "embedded 8/9 texts",
                                                          "embedded 9/9 texts"]  # fmt: skip
    assert all("texts/s" in line and "ETA" in line for line in progress)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_packed_binary_is_packbits_of_the_sign_bits(model_dir, reference, tmp_path):
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    common = ["--model", str(model_dir), "--input", str(tmp_path / "texts.txt"), "--dim", "64"]
    assert run_cli([*common, "--output", str(tmp_path / "float.npy")]) == 0
    assert run_cli([*common, "--output", str(tmp_path / "bits.npy"), "--binary"]) == 0
    assert run_cli([*common, "--output", str(tmp_path / "bits_float.npy"), "--binary", "float"]) == 0
    floats, bits = np.load(tmp_path / "float.npy"), np.load(tmp_path / "bits.npy")
    assert bits.dtype == np.uint8 and bits.shape == (3, 8) and bits.nbytes * 32 == floats.nbytes
    np.testing.assert_array_equal(bits, np.packbits(floats > 0, axis=-1))
    signs = (floats > 0).astype(np.float32)  # the reference's float form: {0,1} then L2
    np.testing.assert_allclose(np.load(tmp_path / "bits_float.npy"), signs / np.linalg.norm(signs, axis=-1,
                                                                                             keepdims=True))  # fmt: skip
    # Hamming similarity as the README computes it
    hamming = np.bitwise_count(bits[:, None, :] ^ bits[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming, (signs[:, None, :] != signs[None, :, :]).sum(-1))
    assert np.all(np.diag(hamming) == 0)


def test_local_looking_missing_model_is_an_error_not_a_hub_request(model_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError(f"Hub request for {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "texts.txt").write_text("a text\n")
    for model in ("outputs/mdoel", "./model", "~/no-such-model", "model.safetensors", "no_slash", "a/b/c"):
        assert run_cli(["--model", model, "--input", "texts.txt", "--output", "o.npy"]) == 2, model
        assert "does not exist" in one_error_line(capsys.readouterr().err), model
    assert run_cli(["--model", "outputs/mdoel", "--input", "texts.txt", "--output", "o.npy"]) == 2
    assert "(outputs/ exists here, so it is a local path)" in capsys.readouterr().err


@pytest.mark.parametrize("name, raw, message", [
    ("empty.txt", b"one\n\nthree\n", "empty.txt:2: empty text"),
    ("spaces.txt", b"one\n   \n", "spaces.txt:2: empty text"),
    ("none.txt", b"", "none.txt: holds no texts"),
    ("utf16.txt", "one\n".encode("utf-16"), "utf16.txt:1: UTF-16/UTF-32 input"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n', "bad.jsonl:2: malformed JSON"),
    ("field.jsonl", b'{"text": "a"}\n{"txt": "b"}\n', ("field.jsonl:2: expected a string or an object with a string "
                                                       "'text' field, found an object without a 'text' field (keys: txt)")),
    ("number.jsonl", b'{"text": 5}\n', ("number.jsonl:1: expected a string or an object with a string 'text' field, "
                                        "found an object whose 'text' is a number")),
    ("cut.json", b'[\n"a",\n"b",\n"c', "cut.json:4: malformed JSON (Unterminated string"),
    ("item.json", b'[\n"a",\n{"text": ""}\n]', "item.json:3: item 1: empty text"),
    ("open.json", b'[\n"a",\n"b"\n', "open.json:4: malformed JSON (expected ',' or ']' after item 1, found end"),
    ("twice.json", b'{"text": "a"} {"text": "b"}', "twice.json:1: extra data after the JSON value"),
    ("surrogate.jsonl", b'"\\ud800"\n', "surrogate.jsonl:1: lone surrogate"),
    ("broken.txt.gz", gzip.compress(b"a\nb\n")[:-6], "broken.txt.gz: corrupt or truncated gzip data"),
    ("mixed.txt", "caf\u00e9\n".encode() + "caf\u00e9\n".encode("latin-1"), "mixed.txt:2: not valid UTF-8"),
])  # fmt: skip
def test_readers_name_file_and_line(tmp_path, name, raw, message):
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(InputError) as err:
        read_texts(tmp_path / name)
    assert str(err.value).startswith(f"{tmp_path}/{message}")


# ---- property: generated bad input never gives a wrong answer ----

GOOD = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\ufeff"),
               min_size=1, max_size=12).filter(str.strip)  # fmt: skip
VALUES = {
    "text": GOOD,
    "empty": st.sampled_from(["", " ", "\t "]),
    "latin1": st.text("éàüßñ", min_size=1, max_size=5),  # not UTF-8
    "truncated": GOOD,  # JSON cut short (in a .txt file: just a text)
}
ITEMS = st.sampled_from(["text"] * 9 + ["empty", "latin1", "truncated"]).flatmap(
    lambda kind: st.tuples(st.just(kind), VALUES[kind]))


def build_input(items: list[tuple[str, str]], fmt: str) -> tuple[bytes, int | None, int]:
    """(file bytes, the line a correct reader must report first, or None, and the number of texts). One item per
    line; a .json list opens with "[" on line 1. Undecodable bytes are found before any parsing."""
    lines = []
    for kind, value in items:
        if fmt == "txt":
            lines.append(value.encode("latin-1" if kind == "latin1" else "utf-8"))
            continue
        text = json.dumps(value, ensure_ascii=False).encode()
        if kind == "latin1":
            text = b'"' + value.encode("latin-1") + b'"'
        record = b'{"text": ' + text + b"}" if fmt == "jsonl" else text
        lines.append(record[:-1] if kind == "truncated" else record)
    data = b"[\n" + b",\n".join(lines) + b"\n]\n" if fmt == "json" else b"\n".join(lines) + b"\n"
    kinds = [kind for kind, _ in items]
    bad = {"empty"} if fmt == "txt" else {"empty", "truncated"}
    first_bad = [i for i, k in enumerate(kinds) if k == "latin1"] or [i for i, k in enumerate(kinds) if k in bad]
    error_line = (2 if fmt == "json" else 1) + first_bad[0] if first_bad else None
    return data, error_line, sum(k not in bad for k in kinds)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(ITEMS, min_size=1, max_size=5), fmt=st.sampled_from(["txt", "jsonl", "json"]),
       compress=st.booleans(), noise=st.one_of(st.none(), st.none(), st.binary(min_size=1, max_size=40)))  # fmt: skip
def test_generated_bad_input_is_embedded_or_named(model_dir, tmp_path_factory, capsys, items, fmt, compress, noise):
    folder = tmp_path_factory.mktemp("gen")
    data, error_line, texts = build_input(items, fmt)
    if noise is not None:  # random bytes: whatever they are, the outcome must agree with the reader
        data = noise
    name = folder / (f"input.{fmt}" + (".gz" if compress else ""))
    name.write_bytes(gzip.compress(data) if compress else data)
    out = folder / "out.npy"
    capsys.readouterr()
    with time_limit(60):
        code = run_cli(["--model", str(model_dir), "--input", str(name), "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    event("embedded" if code == 0 else "named error")
    if noise is not None:
        try:
            texts, error_line = len(read_texts(name)), None
        except InputError as reader_error:
            texts, error_line = 0, str(reader_error)
    if error_line is None:
        assert code == 0, err
        assert np.load(out).shape == (texts, 128)
    else:
        assert code == 2
        message = one_error_line(err)
        assert message.startswith(f"{name}:{error_line}:" if isinstance(error_line, int) else error_line)
        assert not out.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted([name.name] + (["out.npy"] if code == 0 else []))


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.binary(max_size=30), st.builds(lambda q, d, n: json.dumps(
    {"query": q, "document": d, "negatives": n}).encode(), GOOD, GOOD, st.lists(st.sampled_from(["", "x", "x", "y"]),
    max_size=4)), st.builds(lambda t: t.encode()[: len(t) // 2], GOOD.map(lambda t: json.dumps({"query": t})))),
    max_size=8))  # fmt: skip
def test_generated_bad_lines_are_read_or_quarantined_by_the_ops_readers(tmp_path_factory, lines):
    """ops.readers on a jsonl pair file of random lines: every line is a row or a quarantined row, none lost."""
    from ops import io as ops_io
    from ops.readers import FilePlan, ReadFiles, SourceConfig

    folder = tmp_path_factory.mktemp("readers")
    source = folder / "pairs.jsonl"
    source.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    config = SourceConfig(name="gen", path=str(source), negatives_column="negatives")
    reader = ReadFiles({"gen": config.__dict__}, "pairs", str(folder / "out"), max_chars=1000)
    event(f"{len(lines)} lines")
    with time_limit(30):
        rows = [r for table in reader.read_file(FilePlan("gen", str(source), "jsonl", "k")) for r in table.to_pylist()]
    stats = ops_io.collect_stats(str(folder / "out"))[0]
    quarantined = ops_io.read_quarantine(str(folder / "out"))
    data = source.read_bytes()
    count = data.count(b"\n") + (len(data) > 0 and not data.endswith(b"\n"))
    assert stats["rows_in"] == count == len(rows) + len(quarantined)
    assert sorted([r["line"] for r in rows] + [q["line"] for q in quarantined]) == list(range(1, count + 1))
    for row in rows:
        negatives = row["negatives"]
        assert all(n.strip() for n in negatives) and len(set(negatives)) == len(negatives)
        assert row["query"] not in negatives and row["document"] not in negatives
