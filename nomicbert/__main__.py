"""Command line: ``python -m nomicbert embed --model PATH_OR_HUB_ID --input TEXTS --output OUT.npy [...]``.

Every argument is checked before the model is loaded (the input is read and parsed in full, the model's
config.json read for ``--dim``, the output folder checked), and a user mistake ends with one line
``python -m nomicbert embed: error: <file:line: what>`` and exit code 2, never a traceback. OUT.npy is written
exactly at the path given, all at once (a failed or interrupted run leaves no file): float32 [n, d] with one row
per input text, in input order, or with ``--binary`` the packed sign bits, uint8 [n, ceil(d / 8)].
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from nomicbert.config import TASK_PREFIXES, NomicBertConfig, check_dim, load_config
from nomicbert.texts import FORMATS, InputError, read_texts

PROG = "python -m nomicbert"
LONG_INPUT = 10_000  # texts: progress is shown on a non-interactive stderr from this many on
REPORT_EVERY_S = 10.0  # seconds between progress lines on a non-interactive stderr


class UsageError(ValueError):
    """A mistake in the arguments or the files they name: printed as one line, exit code 2."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser(
        "embed", help="embed texts with a NomicBert checkpoint", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    embed.add_argument("--model", required=True, help="our checkpoint folder, a published folder or a Hub id")
    embed.add_argument("--input", required=True,
                       help="texts: .txt (one per line), .jsonl (a string or an object with --field per line), "
                            ".json (a list of strings or objects), any of them .gz; - reads stdin")  # fmt: skip
    embed.add_argument("--format", choices=FORMATS, default="auto",
                       help="input format (auto: by extension, then by content)")  # fmt: skip
    embed.add_argument("--field", default="text", help="the text field of JSON objects (default: text)")
    embed.add_argument("--output", required=True, help="output .npy, written at exactly this path")
    embed.add_argument("--task", choices=sorted(TASK_PREFIXES), help="task prefix to prepend")
    embed.add_argument("--dim", type=positive_int,
                       help="Matryoshka dimension (64..hidden): v1.5 LayerNorm, first dim features, L2")  # fmt: skip
    embed.add_argument("--binary", nargs="?", const="packed", choices=["packed", "float"],
                       help="binary embeddings (v1.5 LayerNorm, > 0): packed bits, uint8 (default), or "
                            "--binary float for the reference's L2-normalised {0,1} float32")  # fmt: skip
    embed.add_argument("--max-length", type=int, default=512, help="truncate inputs to this many tokens (2..8192)")
    embed.add_argument("--rotary-scaling-factor", type=float, help="dynamic NTK alpha (2 serves 8192 tokens)")
    embed.add_argument("--batch-size", type=positive_int, default=256)
    embed.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    embed.add_argument("--fp32", action="store_true", help="run in fp32 on GPU (default bf16)")
    embed.add_argument("--quiet", action="store_true", help="no progress and no summary line on stderr")
    return parser, embed


def warn(message: str) -> None:
    print(f"{PROG} embed: warning: {message}", file=sys.stderr)


def check_arguments(args: argparse.Namespace) -> None:
    """What needs neither the model config nor the input."""
    if not 2 <= args.max_length <= 8192:
        raise UsageError(f"--max-length must be within 2..8192 (got {args.max_length})")
    if args.rotary_scaling_factor is not None and not args.rotary_scaling_factor >= 1:
        raise UsageError(f"--rotary-scaling-factor must be >= 1 (got {args.rotary_scaling_factor})")


def check_output(output: Path, input_path: str) -> None:
    """The output is a file path whose nearest existing ancestor is a writable folder, and not the input."""
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; give a file path such as {output / 'embeddings.npy'}")
    if input_path != "-" and Path(input_path).exists() and output.exists() and output.samefile(input_path):
        raise UsageError(f"--output {output} is the input file")
    folder = output.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output}: cannot write under {folder}")


def check_model(args: argparse.Namespace) -> NomicBertConfig:
    """The model's config.json (no weights) and the arguments that depend on it."""
    try:
        config = load_config(args.model)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {args.model}: {err}") from None
    try:
        check_dim(args.dim, config.hidden_size)
    except ValueError as err:
        raise UsageError(f"--dim {args.dim}: {err}, the dims {args.model} can give") from None
    if args.dim is not None and args.dim not in config.trained_dims:
        kind = "Matryoshka dims" if config.embedding_recipe == "v1.5" else "dim (a v1 model, not Matryoshka-trained)"
        warn(f"--dim {args.dim} is not one of the model's trained {kind} {list(config.trained_dims)}; "
             "its embeddings are the first features of the full ones and may retrieve worse")  # fmt: skip
    scaling = args.rotary_scaling_factor or config.rotary_scaling_factor
    if args.max_length > config.max_trained_positions and not scaling:
        warn(f"--max-length {args.max_length} exceeds the {config.max_trained_positions} positions the model was "
             "trained on and no NTK scaling is set; pass --rotary-scaling-factor 2 for long inputs")  # fmt: skip
    return config


def check_device(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here (use --device cpu)")


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """texts/s and ETA on stderr: rewritten in place on a terminal, a line every REPORT_EVERY_S otherwise."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.start, self.last = total, time.monotonic(), 0.0
        self.interactive = sys.stderr.isatty()
        self.enabled = not quiet and (self.interactive or total >= LONG_INPUT)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.interactive and now - self.last < REPORT_EVERY_S and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = format_seconds((self.total - done) / rate) if rate > 0 else "?"
        line = f"embedded {done}/{self.total} texts, {rate:.1f} texts/s, ETA {eta}"
        print(f"\r{line}" if self.interactive else line, end="" if self.interactive else "\n", file=sys.stderr,
              flush=True)  # fmt: skip
        if self.interactive and done >= self.total:
            print(file=sys.stderr)


def write_npy(output: Path, array) -> None:
    """np.save at exactly ``output`` (np.save on a name would add .npy), through a temp file and a rename."""
    import numpy as np

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.{os.getpid()}.tmp"
    try:
        with tmp.open("wb") as handle:
            np.save(handle, array)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def embed_command(args: argparse.Namespace) -> None:
    check_arguments(args)
    output = Path(args.output)
    check_output(output, args.input)
    check_model(args)
    if args.input == "-" and sys.stdin.isatty() and not args.quiet:
        print("reading texts from the terminal; end with Ctrl-D", file=sys.stderr)
    try:
        texts = read_texts(args.input, args.format, args.field)
    except InputError as err:
        raise UsageError(str(err)) from None
    check_device(args.device)

    import numpy as np
    import torch

    from nomicbert.embed import Embedder

    try:
        embedder = Embedder.from_pretrained(
            args.model,
            rotary_scaling_factor=args.rotary_scaling_factor,
            device=args.device,
            dtype=torch.float32 if args.fp32 else None,
            max_length=args.max_length,
            batch_size=args.batch_size,
        )
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError: weights that do not fit
        raise UsageError(f"--model {args.model}: {err}") from None
    progress = Progress(len(texts), args.quiet)
    parts = []
    for start in range(0, len(texts), args.batch_size):  # one embedding never depends on its batch mates
        parts.append(embedder.encode(texts[start : start + args.batch_size], args.task, args.dim, args.binary or False))
        progress.update(min(start + args.batch_size, len(texts)))
    vectors = np.concatenate(parts)
    width = args.dim or embedder.config.hidden_size
    if args.binary == "float":
        empty = int((vectors.sum(-1) == 0).sum())
        if empty:
            warn(f"{empty} of {len(texts)} texts have no positive bit in their {width} dims: their float binary "
                 "vectors are all zeros (the packed form, --binary, has a well-defined Hamming distance)")  # fmt: skip
    write_npy(output, vectors)
    if not args.quiet:
        what = f"uint8 packed binary embeddings ({width} bits each)" if args.binary == "packed" else \
            f"float32 {'binary ' if args.binary else ''}embeddings"  # fmt: skip
        print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} {what} to {output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser, embed = build_parser()
    args = parser.parse_args(argv)
    try:
        embed_command(args)
    except UsageError as err:
        embed.exit(2, f"{embed.prog}: error: {err}\n")
    except KeyboardInterrupt:
        embed.exit(130, f"\n{embed.prog}: interrupted; no output written\n")


if __name__ == "__main__":
    main()
