"""Non-finite steps: skipped on the device and counted, never checkpointed, and a run of them stops the job once
(Ray Train does not retry a deterministic failure)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray.cloudpickle
import torch
import train_helpers
from safetensors.torch import load_file
from train_helpers import local_mlm_batches, make_mlm_data, poison_gradients, stage_config

from workflows import mlm
from workflows.optimization import NonFiniteStepsError
from workflows.session import Session


def mlm_setup(tmp_path: Path, shared: Path, **overrides):
    data = make_mlm_data(shared, tmp_path / "mlm-data", rows=16, row_length=32)
    cfg = stage_config(mlm.MLMConfig, "mlm", tmp_path, data=str(data), output_dir=str(tmp_path / "out"), model="tiny",
                       model_overrides={}, global_batch=2, micro_batch=2, max_steps=0,
                       **{"optim.warmup_ratio": 0.0, "run.checkpoint_every": 1, **overrides})  # fmt: skip
    return cfg, local_mlm_batches(data, 2)


def checkpoints(root: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {int(p.name.split("-")[1]): load_file(p / "model.safetensors") for p in sorted(root.glob("step-*"))}


def test_an_inf_gradient_is_skipped_and_training_goes_on(tmp_path, shared_data, monkeypatch):
    cfg, batches = mlm_setup(tmp_path, shared_data, **{"optim.max_skipped_in_row": 2})
    build = mlm.build_model
    monkeypatch.setattr(mlm, "build_model", lambda c: (m := build(c), poison_gradients(m, {2}))[0])
    result = mlm.train(cfg, iter(batches), Session.local(tmp_path / "ckpt", device="cpu"), total_steps=6)
    assert result["step"] == 6 and result["skipped_steps"] == 1.0 and torch.isfinite(torch.tensor(result["loss"]))
    saved = checkpoints(tmp_path / "ckpt")
    assert sorted(saved) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(t).all() for weights in saved.values() for t in weights.values())
    assert all(torch.equal(saved[1][k], saved[2][k]) for k in saved[1])  # step 2 left the weights alone
    assert not all(torch.equal(saved[2][k], saved[3][k]) for k in saved[2])  # step 3 trained again


def test_too_many_non_finite_steps_in_a_row_stop_with_the_steps_named(tmp_path, shared_data, monkeypatch):
    cfg, batches = mlm_setup(tmp_path, shared_data, **{"optim.max_skipped_in_row": 3})
    build = mlm.build_model
    monkeypatch.setattr(mlm, "build_model", lambda c: (m := build(c), poison_gradients(m, {3, 4, 5}))[0])
    with pytest.raises(NonFiniteStepsError, match=r"steps 3\.\.5: 3 optimizer steps in a row"):
        mlm.train(cfg, iter(batches), Session.local(tmp_path / "ckpt", device="cpu"), total_steps=8)
    saved = checkpoints(tmp_path / "ckpt")
    assert sorted(saved) == [1, 2, 3, 4]  # step 5 stopped before its checkpoint
    assert all(torch.isfinite(t).all() for weights in saved.values() for t in weights.values())


def test_weights_pushed_past_the_float_range_are_never_checkpointed(tmp_path, shared_data):
    """Finite gradients with an absurd LR: the weights overflow; no checkpoint holds them, the job stops."""
    cfg, batches = mlm_setup(tmp_path, shared_data, **{"optim.lr": 1e30, "optim.max_skipped_in_row": 3})
    with pytest.raises(NonFiniteStepsError):
        mlm.train(cfg, iter(batches), Session.local(tmp_path / "ckpt", device="cpu"), total_steps=8)
    saved = checkpoints(tmp_path / "ckpt")
    assert all(torch.isfinite(t).all() for weights in saved.values() for t in weights.values())


def test_ray_train_does_not_retry_a_run_of_non_finite_steps(tmp_path, shared_data, ray_session, mlflow_uri):
    from workflows import launch

    ray.cloudpickle.register_pickle_by_value(train_helpers)  # the worker loop lives in the tests folder
    cfg, _ = mlm_setup(tmp_path, shared_data, **{"optim.max_skipped_in_row": 2, "run.num_workers": 1,
                                                 "run.cpus_per_worker": 0.5, "run.max_failures": 2})  # fmt: skip
    epochs, schedule = mlm.build_dataset(cfg)
    attempts = tmp_path / "attempts.txt"
    with pytest.raises(NonFiniteStepsError, match=r"\[mlm\] steps 2\.\.3"):
        launch.fit("mlm", cfg, train_helpers.inf_gradient_loop, epochs, schedule, kind="mlm",
                   extra_loop_config={"inf_steps": [2, 3], "attempts": str(attempts)})  # fmt: skip
    assert attempts.read_text().count("attempt") == 1
