"""Typed YAML configs: every unknown or missing key is named; overrides reach nested keys and list items."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ops.config import ConfigError, apply_overrides, fingerprint, flatten, load_config


@dataclass
class Inner:
    a: int
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    name: str
    inner: Inner
    items: list[Inner] = field(default_factory=list)
    lr: float = 1e-3
    mode: str | None = None


def test_valid_config_with_overrides():
    config = load_config(Outer, raw={"name": "x", "inner": {"a": 1}, "items": [{"a": 2}, {"a": 3}]},
                         overrides=["lr=2e-5", "inner.names=[u, v]", "items.1.a=7"])  # fmt: skip
    assert config.lr == 2e-5 and config.inner.names == ["u", "v"] and config.items[1].a == 7


@pytest.mark.parametrize(("raw", "overrides", "message"), [
    ({"name": "x"}, [], "missing required key(s) ['inner']"),
    ({"name": "x", "inner": {"a": 1}, "lrr": 1}, [], "unknown key(s) ['lrr']"),
    ({"name": "x", "inner": {"a": 1, "b": 2}}, [], "Outer.inner: unknown key(s) ['b']"),
    ({"name": "x", "inner": {"a": "one"}}, [], "Outer.inner.a: expected int"),
    ({"name": "x", "inner": {"a": 1}, "items": []}, ["items.0.a=1"], "0 is not an index of a 0-item list"),
    ({"name": "x", "inner": {"a": 1}}, ["items.0.a=1"], "Outer.items: expected a list"),
    ({"name": "x", "inner": {"a": 1}}, ["lr"], "not key=value"),
])  # fmt: skip
def test_bad_configs_name_the_problem(raw, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, raw=raw, overrides=overrides)
    assert message in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_fingerprint_and_flatten():
    a = load_config(Outer, raw={"name": "x", "inner": {"a": 1}})
    b = load_config(Outer, raw={"name": "x", "inner": {"a": 2}})
    assert fingerprint(a) != fingerprint(b) and fingerprint(a) == fingerprint(load_config(Outer, raw={"name": "x", "inner": {"a": 1}}))
    assert flatten(a)["inner.a"] == 1
    assert apply_overrides({"k": {"l": 1}}, ["k.l=2"]) == {"k": {"l": 2}}


def test_every_shipped_yaml_config_loads():
    """Each workflows/configs/*.yaml validates against its job's class (a typo fails here, not on a cluster)."""
    from evaluation.beir_split import BeirSplitConfig
    from ops.mine_negatives import MineNegativesConfig
    from ops.mlm_data import MlmDataConfig
    from ops.pair_data import PairDataConfig
    from workflows.ablate import AblateConfig
    from workflows.contrastive import ContrastiveConfig
    from workflows.evaluate import EvaluateConfig
    from workflows.finetune import FinetuneConfig
    from workflows.matryoshka import MatryoshkaConfig
    from workflows.mlm import MLMConfig
    from workflows.pipeline import PipelineConfig
    from workflows.st_baseline import StBaselineConfig

    classes = {"mlm_data": MlmDataConfig, "pair_data": PairDataConfig, "mine_negatives": MineNegativesConfig,
               "mlm": MLMConfig, "contrastive": ContrastiveConfig, "finetune": FinetuneConfig,
               "matryoshka": MatryoshkaConfig, "evaluate": EvaluateConfig, "ablate": AblateConfig,
               "beir_split": BeirSplitConfig, "st_baseline": StBaselineConfig}  # fmt: skip
    folder = Path(__file__).resolve().parent.parent / "workflows" / "configs"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for file in files:
        stem = file.stem.removesuffix("_8gpu").removesuffix("_multinode")
        # a stage config is named after its stage, optionally with a suffix (finetune_minilm.yaml)
        stage = max((k for k in classes if stem == k or stem.startswith(k + "_")), key=len, default=None)
        if stage is not None:
            load_config(classes[stage], file)
        else:
            load_config(PipelineConfig, file)


@pytest.mark.parametrize(("override", "message"), [
    ("dropout=1.5", "dropout must be within [0, 1)"),
    ("run.threads=-1", "run.threads must be >= 0"),
])  # fmt: skip
def test_training_dropout_and_threads_are_checked(override, message):
    from workflows.finetune import FinetuneConfig

    with pytest.raises((ConfigError, ValueError), match=re.escape(message)):
        load_config(FinetuneConfig, "workflows/configs/finetune_minilm.yaml", overrides=[override])


def adapt_pipeline(stage: str, init_from: str) -> dict:
    from ops.config import read_yaml

    raw = read_yaml("workflows/configs/adapt_minilm.yaml")
    raw["stages"][stage]["init_from"] = init_from
    return raw


@pytest.mark.parametrize(("stage", "init_from", "message"), [
    ("matryoshka", "st_baseline", "stage matryoshka: init_from 'st_baseline' is not an enabled trainer that runs "
                                  "before it (those are ['finetune'])"),
    ("finetune", "matryoshka", "stage finetune: init_from 'matryoshka' is not an enabled trainer that runs before "
                               "it (those are [])"),
    ("evaluate", "finetune", "stage evaluate: init_from is for the trainers that start from a model"),
])  # fmt: skip
def test_pipeline_init_from_must_name_an_earlier_trainer(stage, init_from, message):
    from workflows.pipeline import PipelineConfig, validate

    config = load_config(PipelineConfig, raw=adapt_pipeline(stage, init_from))
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config)


def test_pipeline_init_from_wires_the_earlier_trainers_model_and_lineage():
    """Matryoshka after the fine-tune: its init checkpoint is the fine-tuned model, and the fine-tune's fingerprint
    is among its inputs (a changed fine-tune re-runs it); without ``init_from`` it starts where its YAML says."""
    from workflows.pipeline import STAGES, PipelineConfig, stage_config, stage_inputs, validate

    matryoshka = next(stage for stage in STAGES if stage.name == "matryoshka")
    done = {"mine_negatives": {"output": "/out/mine_negatives"}, "finetune": {"model": "/out/finetune/model"}}
    chained = load_config(PipelineConfig, raw=adapt_pipeline("matryoshka", "finetune"))
    validate(chained)
    ref = chained.stages["matryoshka"]
    assert stage_config(matryoshka, ref, "/out", done).init_checkpoint == "/out/finetune/model"
    assert "finetune" in stage_inputs(matryoshka, ref)
    plain = load_config(PipelineConfig, raw=adapt_pipeline("matryoshka", None)).stages["matryoshka"]
    assert stage_config(matryoshka, plain, "/out", done).init_checkpoint == "outputs/finetune_minilm"  # its YAML
    assert "finetune" not in stage_inputs(matryoshka, plain)
