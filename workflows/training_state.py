"""The training-state files of a checkpoint, safe to read from shared storage: tensors (optimizer moments, RNG
state) in ``state.safetensors``, everything else (step, data position, scheduler, optimizer settings) in
``state.json``. Neither format can run code when read, unlike the pickle (``state.pt``) of older checkpoints,
which is refused; ``python -m workflows.training_state convert <folder>`` converts those without running code.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

DIR = "training_state"  # inside a checkpoint folder
TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"
PICKLED_FILE = "state.pt"  # the old format
FORMAT = "nomic-embed-ray/training-state/1"
# JSON stand-ins for what JSON lacks: a tensor (by its key in the safetensors file), a tuple, a non-string-keyed dict
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


class PickledStateError(RuntimeError):
    """A checkpoint whose training state is a pickle: not loaded, since unpickling can run code."""


def split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` under their path; anything else is an error (a type
    that only pickle could store would need code to rebuild)."""
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors at {path!r}")
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR: path}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {TENSOR, TUPLE, ITEMS} & set(value):
            return {k: split(v, f"{path}/{k}", tensors) for k, v in value.items()}
        if all(isinstance(k, (str, int)) for k in value):
            return {ITEMS: [[k, split(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    raise TypeError(f"training state at {path or '/'}: cannot store a {type(value).__name__} without pickle")


def join(value: Any, tensors: dict[str, torch.Tensor], file: Path) -> Any:
    """The inverse of `split`."""
    if isinstance(value, list):
        return [join(v, tensors, file) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        if value[TENSOR] not in tensors:
            raise ValueError(f"{file} names tensor {value[TENSOR]!r}, which {TENSORS_FILE} lacks")
        return tensors[value[TENSOR]]
    if TUPLE in value:
        return tuple(join(v, tensors, file) for v in value[TUPLE])
    if ITEMS in value:
        return {k: join(v, tensors, file) for k, v in value[ITEMS]}
    return {k: join(v, tensors, file) for k, v in value.items()}


def write(folder: Path, state: dict[str, Any]) -> None:
    """``state`` into ``folder`` as ``state.json`` + ``state.safetensors``, each renamed into place (the JSON last:
    its presence means the state is whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    document = {"format": FORMAT, "state": split(state, "", tensors)}
    save_file(tensors, str(folder / f".{TENSORS_FILE}.tmp"))
    os.replace(folder / f".{TENSORS_FILE}.tmp", folder / TENSORS_FILE)
    (folder / f".{JSON_FILE}.tmp").write_text(json.dumps(document, indent=1))
    os.replace(folder / f".{JSON_FILE}.tmp", folder / JSON_FILE)


def read(folder: Path) -> dict[str, Any]:
    """The state `write` wrote; a folder holding only a pickled ``state.pt`` raises `PickledStateError` without
    opening it."""
    file = folder / JSON_FILE
    if not file.is_file():
        if (folder / PICKLED_FILE).is_file():
            raise PickledStateError(
                f"{folder / PICKLED_FILE} is a pickled training state (the format before safetensors + JSON); it is "
                "not loaded, since unpickling a file from storage can run code. Convert it once with "
                f"`python -m workflows.training_state convert {folder.parent}` (it reads the pickle with "
                "torch.load(weights_only=True), which runs no code and refuses anything but tensors and plain "
                "values), then resume."
            )
        raise FileNotFoundError(f"no training state in {folder} (expected {JSON_FILE} and {TENSORS_FILE})")
    document = json.loads(file.read_text())
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{file} is not a training state of format {FORMAT!r}")
    return join(document["state"], load_file(str(folder / TENSORS_FILE), device="cpu"), file)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b or (a != a and b != b)  # NaN equals NaN here


def convert(folder: Path) -> Path:
    """One pickled ``state.pt`` -> ``state.json`` + ``state.safetensors`` (read back and compared), then removed.
    The pickle is read with ``weights_only=True``: no code runs, and anything beyond tensors and plain values
    is refused."""
    pickled = folder / PICKLED_FILE
    try:
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only raises for anything it does not allow
        raise PickledStateError(f"{pickled} holds more than tensors and plain values; not converted: {err}") from err
    write(folder, state)
    if not same(state, read(folder)):
        raise RuntimeError(f"{folder}: the converted training state differs from {pickled}; {pickled} is kept")
    os.remove(pickled)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workflows.training_state",
        description="Convert pickled training states (training_state/state.pt) under the given folders to "
        "state.json + state.safetensors, without running code from the pickles.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help=f"every {DIR}/{PICKLED_FILE} under these folders (checkpoints, runs)")
    conv.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    found = sorted({p.parent for f in args.folders for p in f.rglob(PICKLED_FILE) if p.parent.name == DIR})
    if not found:
        parser.error(f"no {PICKLED_FILE} under {', '.join(map(str, args.folders))}")
    for folder in found:
        convert(folder)
        print(f"converted {folder / PICKLED_FILE} -> {JSON_FILE} + {TENSORS_FILE}")


if __name__ == "__main__":
    main()
