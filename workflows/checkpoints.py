"""Checkpoints: the model folder (our layout) plus ``training_state/``, written to a temp folder and renamed, so a
crash never leaves a half-written checkpoint; the same layout under DDP and FSDP."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nomicbert.checkpoint import load_state_dict_strict, read_state_dict
from workflows import training_state

STATE_DIR = training_state.DIR
PROGRESS_FILE = "progress.json"


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded weights and optimizer state (keyed by parameter name) on CPU, the same for DDP and FSDP, so
    a checkpoint resumes under either strategy. Collective under FSDP: every rank calls it; rank 0 gets it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,  # fmt: skip
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def write_checkpoint(folder: Path, save_model: Callable[[Path, dict[str, torch.Tensor]], Any],
                     state: dict[str, Any]) -> None:  # fmt: skip
    """The model folder, written by ``save_model(folder, weights)`` from ``state["weights"]`` (`full_state`): our
    layout via `nomicbert.checkpoint.save_pretrained`, or an `Encoder`'s own (``Encoder.save``, read back by
    `nomicbert.encoders.load_encoder`); plus optimizer, scheduler, step, data position and RNG under
    ``training_state/``."""
    state = dict(state)
    save_model(folder, state.pop("weights"))
    training_state.write(folder / STATE_DIR, state)  # safetensors + JSON: reading it back runs no code
    progress = {k: v for k, v in state.items() if isinstance(v, (int, float, str))}
    (folder / STATE_DIR / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))


def atomic_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temp sibling, then rename: a crash mid-write leaves no folder under ``target``'s name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():  # replace: move the old one aside first (rename of a non-empty dir cannot overwrite)
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_weights(folder: Path, model: nn.Module) -> dict[str, Any]:
    """A checkpoint's weights into the (not yet sharded) model; returns its training state for `restore`. The
    state is read first: an old pickled one stops the resume before anything is loaded."""
    state = training_state.read(folder / STATE_DIR)
    load_state_dict_strict(model, read_state_dict(folder))
    return state


def restore(state: dict[str, Any], model: nn.Module, optimizer, sched) -> tuple[int, int]:
    """Optimizer, scheduler and RNG from a training state, after `Session.prepare`; returns (step, batches
    consumed)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["batches_consumed"]


def export_final(checkpoint_dir: Path, output_dir: str, kind: str) -> Path:
    """The last checkpoint -> ``output_dir`` + ``training_state/``, replaced atomically: NomicBERT as our layout +
    ``hf/`` (+ ``st/`` for encoders); any other encoder as a sentence-transformers folder with the four prompts."""
    from nomicbert.checkpoint import export_all, load_model
    from nomicbert.encoders import load_encoder
    from nomicbert.tokenizer import load_tokenizer

    if kind == "encoder":
        encoder = load_encoder(checkpoint_dir)
        export = encoder.export
    else:
        model, tokenizer = load_model(checkpoint_dir, kind=kind), load_tokenizer(checkpoint_dir)
        export = lambda folder: export_all(model, folder, tokenizer)  # noqa: E731

    def write(folder: Path) -> None:
        export(folder)
        shutil.copytree(checkpoint_dir / STATE_DIR, folder / STATE_DIR)

    return atomic_folder(Path(output_dir), write)
