"""Texts to embed from a file or stdin: ``.txt``, ``.jsonl``, ``.json`` and gzip of each, checked line by line.

Every problem is an `InputError` whose message starts with ``file:line:``; nothing is skipped silently, so
output row i is always the i-th text of the input. Formats (``fmt="auto"`` decides by extension, then content):

- ``txt``: one text per line; a blank line is an error (it would shift every later row).
- ``jsonl``: one JSON value per line, a string or an object with a string ``field``; blank lines are not records.
- ``json``: one JSON value: a list of strings or of objects with a string ``field``, or one such object.

Gzip is recognised by its magic bytes, whatever the name. Input must be UTF-8 (a UTF-8 byte-order mark is
dropped); the first undecodable byte is reported with its line.
"""

from __future__ import annotations

import gzip
import json
import sys
import zlib
from pathlib import Path
from typing import Literal

TextFormat = Literal["auto", "txt", "jsonl", "json"]
FORMATS = ("auto", "txt", "jsonl", "json")
STDIN = "-"
_SUFFIXES = {".txt": "txt", ".text": "txt", ".tsv": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


class InputError(ValueError):
    """Input that cannot be embedded as asked; the message names the file and line."""


def read_texts(path: str | Path, fmt: TextFormat = "auto", field: str = "text") -> list[str]:
    """All texts of ``path`` (``"-"`` = stdin) in input order, or `InputError` naming ``file:line``."""
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    name = "<stdin>" if str(path) == STDIN else str(path)
    text = decode(name, read_bytes(path))
    if fmt == "auto":
        fmt = detect_format(path, text)
    if fmt == "txt":
        texts = _txt(name, text)
    elif fmt == "jsonl":
        texts = _jsonl(name, text, field)
    else:
        texts = _json(name, text, field)
    if not texts:
        raise InputError(f"{name}: holds no texts")
    return texts


def read_bytes(path: str | Path) -> bytes:
    """The whole input, gunzipped when it starts with the gzip magic bytes."""
    if str(path) == STDIN:
        raw, name = sys.stdin.buffer.read(), "<stdin>"
    else:
        file = Path(path)
        if file.is_dir():
            raise InputError(f"{file}: is a folder; expected a .txt, .jsonl or .json file (or - for stdin)")
        if not file.is_file():
            raise InputError(f"{file}: no such file")
        try:
            raw, name = file.read_bytes(), str(file)
        except OSError as err:
            raise InputError(f"{file}: cannot read ({err.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(f"{name}: corrupt or truncated gzip data ({err})") from None
    return raw


def decode(name: str, raw: bytes) -> str:
    """UTF-8 (BOM dropped) -> str; the first bad byte is reported as ``file:line``."""
    if raw.startswith(_UTF16_32_BOMS):
        raise InputError(f"{name}:1: UTF-16/UTF-32 input (byte-order mark); convert it to UTF-8, "
                         "e.g. iconv -f UTF-16 -t UTF-8")  # fmt: skip
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        byte = raw[err.start : err.start + 1].hex()
        raise InputError(f"{name}:{line}: not valid UTF-8 (byte 0x{byte} at column {column})") from None


def detect_format(path: str | Path, text: str) -> str:
    """``.txt``/``.jsonl`` by extension (``.gz`` stripped); ``.json`` and other names by content: a list or one
    value is JSON, an object per line is JSON Lines (``datasets``' ``to_json`` writes those as ``.json``), else text."""
    suffixes = Path(str(path)).suffixes if str(path) != STDIN else []
    if suffixes and suffixes[-1].lower() == ".gz":
        suffixes = suffixes[:-1]
    by_name = _SUFFIXES.get(suffixes[-1].lower()) if suffixes else None
    if by_name in ("txt", "jsonl"):
        return by_name
    start = text.lstrip()[:1]
    if start == "{" and _looks_like_json_lines(text):
        return "jsonl"
    if by_name == "json" or start in ("[", "{"):
        return "json"
    return "txt"


def _looks_like_json_lines(text: str) -> bool:
    """Not one JSON value, and every non-blank line starts an object."""
    lines = [line.lstrip() for line in text.split("\n") if line.strip()]
    if len(lines) < 2 or not all(line.startswith("{") for line in lines):
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return True
    return False


def _lines(text: str) -> list[str]:
    """Split on \\n only (as ``wc -l`` counts), \\r\\n allowed; a final newline does not start a line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _txt(name: str, text: str) -> list[str]:
    lines = _lines(text)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"{name}:{number}: empty text (every line must hold a text; remove blank lines)")
    return lines


def _text_of(value: object, field: str) -> str | None:
    """A JSON string, or an object's string ``field``; None when it is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get(field), str):
        return value[field]
    return None


def _describe(value: object, field: str) -> str:
    if isinstance(value, dict):
        if field in value:
            return f"an object whose {field!r} is {_describe(value[field], field)}"
        return f"an object without a {field!r} field (keys: {', '.join(map(str, list(value)[:5])) or 'none'})"
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _checked(name: str, number: int, value: object, field: str, what: str = "") -> str:
    text = _text_of(value, field)
    if text is None:
        raise InputError(f"{name}:{number}: {what}expected a string or an object with a string {field!r} field, "
                         f"found {_describe(value, field)}")  # fmt: skip
    if not text.strip():
        raise InputError(f"{name}:{number}: {what}empty text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{name}:{number}: {what}lone surrogate {text[err.start]!r} (not a character)") from None
    return text


def _jsonl(name: str, text: str, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{name}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
        texts.append(_checked(name, number, value, field))
    return texts


def _json(name: str, text: str, field: str) -> list[str]:
    """One JSON value; a list is decoded item by item so an error names the item's line."""
    decoder = json.JSONDecoder()

    def fail(err: json.JSONDecodeError) -> InputError:
        return InputError(f"{name}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})")

    def line_at(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_space(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_space(0)
    if not text.startswith("[", pos):
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise fail(err) from None
        if skip_space(end) != len(text):
            raise InputError(f"{name}:{line_at(end)}: extra data after the JSON value (JSON Lines? use .jsonl)")
        return [_checked(name, line_at(pos), value, field, "the JSON value: ")]
    texts, pos, index = [], skip_space(pos + 1), 0
    if text.startswith("]", pos):
        pos = skip_space(pos + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise fail(err) from None
            texts.append(_checked(name, line_at(pos), value, field, f"item {index}: "))
            index += 1
            pos = skip_space(end)
            if text.startswith(",", pos):
                pos = skip_space(pos + 1)
                continue
            if text.startswith("]", pos):
                pos = skip_space(pos + 1)
                break
            where = "end of input" if pos >= len(text) else repr(text[pos])
            raise InputError(f"{name}:{line_at(pos)}: malformed JSON (expected ',' or ']' after item {index - 1}, "
                             f"found {where})")  # fmt: skip
    if pos != len(text):
        raise InputError(f"{name}:{line_at(pos)}: extra data after the JSON list")
    return texts
