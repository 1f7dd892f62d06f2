"""Checkpoint round trips keep every config field (NTK factor, dropout, problem type, tying), an untied decoder
never overwrites the word embeddings silently, multi-label heads train with BCE, degenerate embeddings fail."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nomicbert.checkpoint import CheckpointError, export_all, load_model, save_pretrained
from nomicbert.config import NomicBertConfig, read_config, tiny
from nomicbert.embed import finalize, pack_bits
from nomicbert.model import NomicBertForPreTraining, NomicBertForSequenceClassification, NomicBertModel

DECODER = "cls.predictions.decoder.weight"


def every_field_changed() -> NomicBertConfig:
    """tiny() with every field away from its default (a round trip that drops one cannot pass)."""
    changed = tiny(
        vocab_size=30592, type_vocab_size=3, pad_token_id=1, layer_norm_eps=1e-6, initializer_range=0.03,
        max_trained_positions=48, max_position_embeddings=1024, rotary_emb_base=500.0, rotary_scaling_factor=2.5,
        ntk_length="batch", embedding_recipe="v1.5", num_labels=5, problem_type="multi_label_classification",
        classifier_dropout=0.0, tie_word_embeddings=False, extra={"note": "kept"},
    )  # fmt: skip
    defaults = NomicBertConfig()
    same = [f.name for f in dataclasses.fields(changed) if f.name not in ("hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "rotary_emb_fraction")  # tiny() / the only supported value
            and getattr(changed, f.name) == getattr(defaults, f.name)]  # fmt: skip
    assert not same, same
    return changed


def test_every_config_field_survives_both_layouts(tmp_path):
    config = every_field_changed()
    assert NomicBertConfig.from_dict(config.to_nomic_dict()) == config
    assert NomicBertConfig.from_dict(config.to_hf_dict()) == config
    folder = export_all(NomicBertForPreTraining(config), tmp_path / "ckpt")
    assert read_config(folder) == config
    assert read_config(folder / "hf") == config
    # what transformers itself writes (id2label, no num_labels) keeps the label count and problem type
    import transformers

    raw = json.loads((folder / "hf" / "config.json").read_text())
    native = transformers.NomicBertConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    native.save_pretrained(tmp_path / "native")
    back = read_config(tmp_path / "native")
    assert (back.num_labels, back.problem_type, back.rotary_scaling_factor) == (5, "multi_label_classification", 2.5)


def test_ntk_round_trip_through_hf_is_exact(tmp_path):
    """Trained length 64, inputs of 200 tokens: the hf/ export loads back with its NTK factor, bit for bit."""
    torch.manual_seed(0)
    model = NomicBertModel(tiny(rotary_scaling_factor=2.0)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("Wqkv.weight"):
                param.mul_(10)  # sharp attention, so positions matter
    folder = export_all(model, tmp_path / "ckpt")
    ids = torch.randint(1000, 30000, (2, 200))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(ids, mask)
        for source in (folder, folder / "hf", folder / "st"):
            assert torch.equal(load_model(source).eval()(ids, mask), want), source
        without_ntk = NomicBertModel(tiny()).eval()
        without_ntk.load_state_dict(model.state_dict())
        assert (without_ntk(ids, mask) - want).abs().max() > 1e-4  # the factor matters at this length


def test_classifier_dropout_zero_survives(tmp_path):
    model = NomicBertForSequenceClassification(tiny(classifier_dropout=0.0))
    for source in (save_pretrained(model, tmp_path / "ours"), export_all(model, tmp_path / "all") / "hf"):
        loaded = load_model(source, kind="classifier").train()  # train mode: dropout would be active
        assert loaded.dropout.p == 0.0
        ids = torch.randint(1000, 30000, (3, 12))
        with torch.no_grad():
            assert torch.equal(loaded(ids)[1], loaded(ids)[1])


def test_untied_decoder_is_an_error_unless_the_config_says_untied(tmp_path):
    torch.manual_seed(1)
    folder = save_pretrained(NomicBertForPreTraining(tiny()), tmp_path / "mlm")
    state = load_file(folder / "model.safetensors")
    assert DECODER not in state  # tied: stored once
    # transformers' export writes the tied decoder as a copy: accepted
    export_all(NomicBertForPreTraining(tiny()), tmp_path / "all")
    assert DECODER in load_file(tmp_path / "all" / "hf" / "model.safetensors")
    load_model(tmp_path / "all" / "hf", kind="mlm")
    # a different decoder under a tied config would overwrite the word embeddings: refused, naming the key
    embeddings = state["bert.embeddings.word_embeddings.weight"]
    save_file({**state, DECODER: torch.randn_like(embeddings)}, str(folder / "model.safetensors"))
    for kind in ("mlm", "encoder"):
        with pytest.raises(CheckpointError, match=f"{DECODER} differs from bert.embeddings.word_embeddings.weight"):
            load_model(folder, kind=kind)
    # the same weights with tie_word_embeddings: false load untied, both matrices intact, and round-trip
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": False}))
    untied = load_model(folder, kind="mlm")
    decoder = load_file(folder / "model.safetensors")[DECODER]
    assert torch.equal(untied.cls.predictions.decoder.weight, decoder)
    assert torch.equal(untied.bert.embeddings.word_embeddings.weight, embeddings)
    again = export_all(untied, tmp_path / "again")
    for source in (again, again / "hf"):
        reloaded = load_model(source, kind="mlm")
        assert torch.equal(reloaded.cls.predictions.decoder.weight, decoder)
        assert torch.equal(reloaded.bert.embeddings.word_embeddings.weight, embeddings)
    # an untied config needs its decoder
    save_file({k: v for k, v in load_file(again / "model.safetensors").items() if k != DECODER},
              str(again / "model.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match=f"missing keys: \\['{DECODER}'\\]"):
        load_model(again, kind="mlm")


def test_multi_label_classification_uses_bce(tmp_path):
    torch.manual_seed(2)
    folder = save_pretrained(NomicBertForSequenceClassification(tiny(num_labels=3,
                             problem_type="multi_label_classification")), tmp_path / "clf")  # fmt: skip
    model = load_model(folder, kind="classifier").eval()
    ids = torch.randint(1000, 30000, (4, 10))
    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    loss, logits = model(ids, labels=labels)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, labels.float()))
    single = load_model(save_pretrained(NomicBertForSequenceClassification(tiny(num_labels=3)), tmp_path / "one"),
                        kind="classifier").eval()  # fmt: skip
    loss, logits = single(ids, labels=torch.tensor([0, 2, 1, 1]))
    assert torch.allclose(loss, F.cross_entropy(logits, torch.tensor([0, 2, 1, 1])))
    with pytest.raises(ValueError, match="problem_type"):
        tiny(problem_type="multi_label")


def test_degenerate_embeddings_are_handled_explicitly():
    pooled = torch.randn(3, 128)
    pooled[1] = 3.0  # constant: all zero after the v1.5 LayerNorm
    pooled[2] = torch.linspace(-1, 1, 128)  # all-negative first half
    with pytest.raises(ValueError, match=r"1 pooled embeddings \(rows \[1\]\) are all zero"):
        finalize(pooled, "v1.5")
    with pytest.raises(ValueError, match=r"rows \[2\]\) are not finite"):
        finalize(torch.cat([pooled[:2], torch.full((1, 128), float("nan"))]), "v1")
    # binary: rows without a positive bit in their dims are valid all-zero codes; the float form is all zeros
    packed = pack_bits(finalize(pooled, "v1.5", dim=64, binary=True, normalize=False))
    assert packed.dtype == np.uint8 and packed.shape == (3, 8)
    assert not packed[1].any() and not packed[2].any() and packed[0].any()
    floats = finalize(pooled, "v1.5", dim=64, binary=True)
    assert torch.equal(floats[1:], torch.zeros(2, 64)) and torch.allclose(floats[0].norm(), torch.tensor(1.0))
