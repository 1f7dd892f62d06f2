"""Shared training pieces: optimizer groups, schedule, atomic checkpoints, config errors, and the NaN guard of a
loop run without Ray (as the GPU benchmarks call it)."""

from __future__ import annotations

import pytest
from train_helpers import stage_config

from nomicbert.config import tiny
from nomicbert.model import NomicBertForPreTraining
from workflows import checkpoints, mlm, optimization, settings


def test_every_parameter_is_in_exactly_one_group():
    model = NomicBertForPreTraining(tiny())
    groups = optimization.param_groups(model, weight_decay=1e-5)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert id(model.bert.embeddings.word_embeddings.weight) in decay  # tied with the decoder, listed once
    assert id(model.bert.emb_ln.weight) in no_decay and id(model.bert.emb_ln.bias) in no_decay
    assert groups[0]["weight_decay"] == 1e-5 and groups[1]["weight_decay"] == 0.0


def test_schedule_warms_up_then_decays_to_zero():
    cfg = settings.OptimConfig(lr=1.0, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0, warmup_steps=0, warmup_ratio=0.06,
                             schedule="linear", max_grad_norm=0.0, max_skipped_in_row=1)  # fmt: skip
    f = optimization.lr_lambda(cfg, 100)
    assert [round(f(s), 3) for s in (0, 5, 6, 53)] == [0.167, 1.0, 1.0, 0.5] and f(100) == 0.0
    cosine = optimization.lr_lambda(settings.OptimConfig(**{**cfg.__dict__, "schedule": "cosine"}), 100)
    assert cosine(6) == 1.0 and abs(cosine(53) - 0.5) < 1e-9 and cosine(100) == 0.0
    with pytest.raises(ValueError, match="not both"):
        settings.OptimConfig(**{**cfg.__dict__, "warmup_steps": 10})


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path):
    target = tmp_path / "step-00000002"
    checkpoints.atomic_folder(target, lambda f: (f / "model.safetensors").write_text("good"))

    def crash(folder):
        (folder / "model.safetensors").write_text("half")
        raise KeyboardInterrupt  # the process dies mid-write

    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_folder(target, crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_folder(tmp_path / "step-00000004", crash)
    assert (target / "model.safetensors").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]  # no partial or temp folder


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="multiple of workers"):
        stage_config(mlm.MLMConfig, "mlm", tmp_path, global_batch=10, micro_batch=4)
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['seed'\]"):
        from ops.config import load_config, read_yaml

        raw = read_yaml(mlm.__file__.replace("mlm.py", "configs/mlm.yaml"))
        del raw["run"]["seed"]
        load_config(mlm.MLMConfig, raw=raw)
