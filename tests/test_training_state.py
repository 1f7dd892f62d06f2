"""Training state without pickle: our states (safetensors + JSON) resume exactly, an old pickled state.pt stops the
resume with the conversion command and converts without running code, and a state.pt that would run code is
refused on resume and by the converter, with nothing run. The loop runs without Ray (`Session.local`), as in
tests/test_train_common.py; the Ray Train kill-and-resume runs are in test_train_distributed/test_train_stages."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from train_helpers import make_mlm_data, masked_rows, stage_config

from nomicbert.checkpoint import read_state_dict
from workflows import checkpoints, mlm, training_state
from workflows.session import Session
from workflows.training_state import PickledStateError

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("state")
    data = make_mlm_data(shared_data, tmp / "mlm-data", rows=2 * STEPS, row_length=32)
    cfg = stage_config(mlm.MLMConfig, "mlm", tmp, data=str(data), output_dir=str(tmp / "out"), model="tiny",
                       model_overrides={}, global_batch=2, micro_batch=2, max_steps=0,
                       **{"optim.lr": 1e-3, "optim.warmup_ratio": 0.0, "run.checkpoint_every": 3})  # fmt: skip
    rows = masked_rows(data)
    return cfg, rows


def train(setup, root, steps_available: int = STEPS):
    """The loop over the first ``steps_available`` global batches of an epoch of STEPS, checkpoints in ``root``."""
    cfg, rows = setup
    batches = ({k: v[i : i + 2] for k, v in rows.items()} for i in range(0, 2 * steps_available, 2))
    return mlm.train(cfg, batches, Session.local(root, device="cpu"), total_steps=STEPS)


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    train(setup, root)
    return read_state_dict(root / f"step-{STEPS:08d}")


def test_our_state_round_trips_exactly_and_resumes_as_if_never_stopped(setup, uninterrupted, tmp_path):
    train(setup, tmp_path, steps_available=3)  # the run stops after the step-3 checkpoint
    folder = tmp_path / "step-00000003" / checkpoints.STATE_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["progress.json", "state.json", "state.safetensors"]
    state = training_state.read(folder)
    assert (state["step"], state["batches_consumed"]) == (3, 3)
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)  # a tuple again, as torch wrote it
    assert state["rng"].dtype == torch.uint8 and isinstance(state["scheduler"]["_last_lr"], list)
    training_state.write(tmp_path / "again", state)
    assert training_state.same(state, training_state.read(tmp_path / "again"))
    train(setup, tmp_path)  # resumes from step 3
    resumed = read_state_dict(tmp_path / f"step-{STEPS:08d}")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # bit for bit


def test_an_old_pickled_state_names_the_conversion_and_converts(setup, uninterrupted, tmp_path):
    train(setup, tmp_path, steps_available=3)
    folder = tmp_path / "step-00000003" / checkpoints.STATE_DIR
    torch.save(training_state.read(folder), folder / "state.pt")  # what checkpoints held before
    (folder / "state.json").unlink()
    (folder / "state.safetensors").unlink()
    with pytest.raises(PickledStateError, match=r"python -m workflows\.training_state convert .*step-00000003"):
        train(setup, tmp_path)
    training_state.main(["convert", str(tmp_path)])
    assert not (folder / "state.pt").exists()
    train(setup, tmp_path)
    resumed = read_state_dict(tmp_path / f"step-{STEPS:08d}")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


class RunsCode:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(setup, tmp_path):
    train(setup, tmp_path, steps_available=3)
    folder = tmp_path / "step-00000003" / checkpoints.STATE_DIR
    for name in ("state.json", "state.safetensors"):
        (folder / name).unlink()
    marker = tmp_path / "code-ran"
    torch.save({"step": 3, "payload": RunsCode(marker)}, folder / "state.pt")
    # the payload is live: a plain unpickling (the old resume) runs it
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                    str(folder / "state.pt")], check=True)  # fmt: skip
    assert marker.read_text() == "ran"
    marker.unlink()

    with pytest.raises(PickledStateError, match="convert"):
        train(setup, tmp_path)  # resume
    with pytest.raises(PickledStateError, match="more than tensors and plain values; not converted"):
        training_state.main(["convert", str(tmp_path)])
    assert not marker.exists()
    assert (folder / "state.pt").exists() and not (folder / "state.json").exists()


def test_a_state_that_needs_pickle_is_not_written(tmp_path):
    with pytest.raises(TypeError, match=r"/scheduler/fn: cannot store a function without pickle"):
        training_state.write(tmp_path, {"step": 1, "scheduler": {"fn": lambda s: s}})
    assert not (tmp_path / "state.json").exists()
