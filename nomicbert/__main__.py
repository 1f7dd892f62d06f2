"""Command line: ``python -m nomicbert embed --model PATH_OR_HUB_ID --input TEXTS --output OUT.npy [...]``.

TEXTS is a text file with one text per line or a jsonl file with a ``text`` field; OUT.npy is a float32
array with one row per input, in input order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read_texts(path: Path) -> list[str]:
    """One text per line (.txt) or a ``text`` field per line (.jsonl); empty texts are errors, not skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if path.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: malformed json ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{number}: expected an object with a string 'text' field")
                line = record["text"]
            if not line.strip():
                raise ValueError(f"{path}:{number}: empty text")
            texts.append(line)
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts


def embed_command(args: argparse.Namespace) -> None:
    import torch

    from nomicbert.embed import Embedder

    texts = read_texts(Path(args.input))
    embedder = Embedder.from_pretrained(
        args.model,
        rotary_scaling_factor=args.rotary_scaling_factor,
        device=args.device,
        dtype=torch.float32 if args.fp32 else None,
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    vectors = embedder.encode(texts, task=args.task, dim=args.dim, binary=args.binary)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.output, vectors.astype(np.float32))
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} float32 embeddings to {args.output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    from nomicbert.embed import TASK_PREFIXES

    parser = argparse.ArgumentParser(prog="python -m nomicbert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed", help="embed texts with a NomicBert checkpoint")
    embed.add_argument("--model", required=True, help="our checkpoint folder, a published folder or a Hub id")
    embed.add_argument("--input", required=True, help="texts: .txt (one per line) or .jsonl (field 'text')")
    embed.add_argument("--output", required=True, help="output .npy (float32, one row per input)")
    embed.add_argument("--task", choices=sorted(TASK_PREFIXES), help="task prefix to prepend")
    embed.add_argument("--dim", type=int, help="Matryoshka dimension (64..hidden): v1.5 LayerNorm, slice, L2")
    embed.add_argument("--binary", action="store_true", help="binary embeddings (v1.5 LayerNorm, > 0)")
    embed.add_argument("--max-length", type=int, default=512, help="truncate inputs to this many tokens")
    embed.add_argument("--rotary-scaling-factor", type=float, help="dynamic NTK alpha (2 serves 8192 tokens)")
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    embed.add_argument("--fp32", action="store_true", help="run in fp32 on GPU (default bf16)")
    args = parser.parse_args(argv)
    if args.max_length > 8192 or args.max_length < 2:
        parser.error(f"--max-length must be within 2..8192 (got {args.max_length})")
    embed_command(args)


if __name__ == "__main__":
    main()
