"""The encoder interface on real checkpoints: a tiny `transformers` BERT (save_pretrained folder) and the
all-MiniLM-L6-v2 package equal sentence-transformers' own ``encode``; a one-step fine-tune changes the weights
and exports a sentence-transformers folder that loads; NomicBERT keeps its packed path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nomicbert.embed import TASK_PREFIXES, Embedder
from nomicbert.encoders import CPU_BATCH_TOKENS, EncoderError, NomicEncoder, TransformersEncoder, load_encoder
from nomicbert.losses import ContrastiveLoss

TEXTS = [
    "what is rotary position embedding?",
    "A man is playing a guitar on a stage in front of a crowd of people who are dancing.",
    "short",
    "Dynamic NTK scaling changes the rotary base with the sequence length, " * 40,  # truncated at the limit
    "Vitamin D deficiency is associated with a higher risk of respiratory infections in adults.",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, shared_data) -> Path:
    """A random 2-layer BERT with the real bert-base-uncased vocabulary, as ``save_pretrained`` writes it."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    BertModel(config).save_pretrained(str(folder))
    tokenizer = BertTokenizerFast(vocab=str(shared_data / "bert-base-uncased-vocab" / "vocab.txt"), do_lower_case=True)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(str(folder))
    return folder


def st_encode(folder: Path, texts: list[str], **kwargs) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return torch.from_numpy(model.encode(texts, convert_to_numpy=True, batch_size=2, **kwargs))


def test_tiny_transformers_folder_equals_sentence_transformers(tiny_bert):
    encoder = load_encoder(tiny_bert, batch_tokens=64)  # several length batches
    assert isinstance(encoder, TransformersEncoder) and encoder.pooling == "mean" and encoder.max_length == 128
    assert len(encoder.length_batches([len(t) for t in encoder.tokenize(TEXTS)])) > 1
    ours = encoder.encode(TEXTS, normalize=False)
    torch.testing.assert_close(ours, st_encode(tiny_bert, TEXTS), atol=1e-5, rtol=0)


def test_minilm_package_equals_sentence_transformers(minilm_path):
    encoder = load_encoder(minilm_path)
    assert encoder.max_length == 256 and encoder.normalize and encoder.prompts == {}
    # on the CPU one forward holds at most CPU_BATCH_TOKENS padded tokens: 32 x 256 tokens -> 4 forwards of 8 rows
    assert [len(b) for b in encoder.length_batches([256] * 32)] == [CPU_BATCH_TOKENS // 256] * 4
    ours = encoder.encode(TEXTS)
    torch.testing.assert_close(ours, st_encode(minilm_path, TEXTS), atol=1e-5, rtol=0)
    # truncated like a Matryoshka model: first d features, L2 (what the evaluation does for a plain model)
    torch.testing.assert_close(encoder.encode(TEXTS, dim=64), torch.nn.functional.normalize(ours[:, :64], dim=-1),
                               atol=1e-6, rtol=0)  # fmt: skip


def test_one_step_fine_tune_changes_weights_and_exports_a_loadable_st_folder(tiny_bert, tmp_path):
    encoder = load_encoder(tiny_bert)
    encoder.prompts = dict(TASK_PREFIXES)  # what the embedding stages do: they train with the task prefixes
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    optimizer = torch.optim.AdamW(encoder.model.parameters(), lr=1e-3)
    queries = encoder.tokenize(encoder.add_prompt(TEXTS[:2], "search_query"))
    documents = encoder.tokenize(encoder.add_prompt(TEXTS[1:5], "search_document"))  # [pos, neg] per query
    encoder.train()
    pooled = encoder(queries + documents)
    ContrastiveLoss(logit_scale=20.0, stride=2)(pooled[:2], pooled[2:]).backward()
    optimizer.step()
    changed = [k for k, v in encoder.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "encoder.layer.0.attention.self.query.weight" in changed and len(changed) > 20

    folder = encoder.export(tmp_path / "model")
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == TASK_PREFIXES
    expected = encoder.encode(TEXTS, task="search_query")
    torch.testing.assert_close(st_encode(folder, TEXTS, prompt_name="search_query"), expected, atol=1e-5, rtol=0)
    reloaded = load_encoder(folder)
    assert reloaded.prompts == TASK_PREFIXES and reloaded.normalize
    torch.testing.assert_close(reloaded.encode(TEXTS, task="search_query"), expected, atol=1e-6, rtol=0)


def test_matryoshka_recipe_exports_the_weightless_layer_norm(tiny_bert, tmp_path):
    encoder = load_encoder(tiny_bert, recipe="v1.5")
    folder = encoder.export(tmp_path / "v15")
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "LayerNorm", "Normalize"]
    ours = encoder.encode(TEXTS)
    torch.testing.assert_close(st_encode(folder, TEXTS), ours, atol=1e-5, rtol=0)
    assert load_encoder(folder).recipe == "v1.5"
    # a truncated v1.5 embedding = the first d features of the LayerNormed vector, re-normalised
    torch.testing.assert_close(encoder.encode(TEXTS, dim=8), torch.nn.functional.normalize(
        torch.nn.functional.layer_norm(encoder.encode(TEXTS, normalize=False), (32,), eps=1e-5)[:, :8], dim=-1))


def test_unsupported_sentence_transformers_modules_are_named(minilm_path, tmp_path):
    folder = Path(shutil.copytree(minilm_path, tmp_path / "dense"))
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(EncoderError, match="Dense"):
        load_encoder(folder)
    (folder / "modules.json").write_text(json.dumps(modules[:2] + modules[3:]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(EncoderError, match="weightedmean"):
        load_encoder(folder)


def test_nomicbert_keeps_its_packed_path(tmp_path):
    from nomicbert.checkpoint import save_pretrained
    from nomicbert.config import tiny
    from nomicbert.model import NomicBertModel
    from nomicbert.tokenizer import load_tokenizer

    torch.manual_seed(0)
    folder = save_pretrained(NomicBertModel(tiny()), tmp_path / "nomic", load_tokenizer())
    encoder = load_encoder(folder)
    assert isinstance(encoder, NomicEncoder) and encoder.prompts == TASK_PREFIXES
    embedder = Embedder.from_pretrained(folder, device="cpu")
    expected = torch.from_numpy(embedder.encode(TEXTS, task="search_document"))
    torch.testing.assert_close(encoder.encode(TEXTS, task="search_document", max_length=512), expected,
                               atol=1e-5, rtol=0)  # fmt: skip
    exported = encoder.export(tmp_path / "export")
    assert (exported / "st" / "modules.json").is_file() and (exported / "hf" / "config.json").is_file()


def test_evaluation_uses_the_prompts_a_model_was_trained_with(tiny_bert, tmp_path, minilm_path):
    """The evaluation passes task prompts to a model that defines them (an adapted one), not to plain MiniLM."""
    from evaluation.encoders import load_encoder as evaluation_encoder

    assert not evaluation_encoder(str(minilm_path)).uses_task_prompts
    encoder = load_encoder(tiny_bert)
    encoder.prompts = dict(TASK_PREFIXES)
    evaluated = evaluation_encoder(str(encoder.export(tmp_path / "prompted")))
    assert evaluated.uses_task_prompts
    raw = torch.from_numpy(evaluated.raw(["vitamin d and infections"], "search_query"))
    expected = encoder.encode(["vitamin d and infections"], task="search_query")
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), expected, atol=1e-5, rtol=0)


def test_dropout_is_set_for_training_and_refused_where_the_model_has_none(tiny_bert, tmp_path):
    from nomicbert.checkpoint import save_pretrained
    from nomicbert.config import tiny
    from nomicbert.model import NomicBertModel
    from nomicbert.tokenizer import load_tokenizer

    encoder = load_encoder(tiny_bert)
    dropouts = [m for m in encoder.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and {m.p for m in dropouts} == {0.1}  # BERT's own
    encoder.set_dropout(0.0)
    assert {m.p for m in dropouts} == {0.0}
    encoder.train()
    torch.testing.assert_close(encoder.encode(TEXTS[:2]), encoder.encode(TEXTS[:2]), atol=0, rtol=0)  # deterministic
    saved = json.loads((encoder.save(tmp_path / "saved") / "config.json").read_text())
    assert saved["hidden_dropout_prob"] == 0.1  # the checkpoint's value; the rate is a training setting
    with pytest.raises(ValueError, match="within"):
        encoder.set_dropout(1.0)
    nomic = load_encoder(save_pretrained(NomicBertModel(tiny()), tmp_path / "nomic", load_tokenizer()))
    nomic.set_dropout(0.0)
    with pytest.raises(ValueError, match="no dropout"):
        nomic.set_dropout(0.1)


def test_cpu_bf16_training_attention_matches_sdpa_and_exports_plain_sdpa(minilm_path, tmp_path):
    """Under bf16 autocast in train mode the attention runs in fp32 (faster backward on CPU): the same embeddings and
    gradients as the plain SDPA path, and the export names no private attention implementation."""
    from transformers import AutoModel

    from nomicbert.encoders import CPU_TRAINING_ATTENTION

    ours = load_encoder(minilm_path)
    assert ours.model.config._attn_implementation == CPU_TRAINING_ATTENTION
    plain = AutoModel.from_pretrained(str(minilm_path), attn_implementation="sdpa")
    reference = TransformersEncoder(plain, ours.tokenizer, ours.max_length, pooling="mean", normalize=True)
    reference.model.set_attn_implementation("sdpa")  # undo the routing the constructor applies
    ids = ours.tokenize(TEXTS)
    results = []
    for encoder in (ours, reference):
        encoder.set_dropout(0.0)
        encoder.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled = encoder(ids).float()
        pooled.pow(2).sum().backward()
        results.append((pooled.detach(), encoder.model.encoder.layer[0].attention.self.query.weight.grad))
    (ours_out, ours_grad), (ref_out, ref_grad) = results
    assert torch.nn.functional.cosine_similarity(ours_out, ref_out).min() > 0.999
    assert torch.nn.functional.cosine_similarity(ours_grad.flatten(), ref_grad.flatten(), dim=0) > 0.99
    folder = ours.export(tmp_path / "export")
    assert "_attn_implementation" not in json.loads((folder / "config.json").read_text())
    torch.testing.assert_close(st_encode(folder, TEXTS), ours.encode(TEXTS), atol=1e-5, rtol=0)
