"""The embedding cache the mining teacher and the evaluation share: keyed by model content, length, precision and
prompt, so a hit is always the vector the reader would have computed."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from evaluation.encoders import ModelSpec, load_encoder
from ops.embedding_cache import EmbeddingCache, model_fingerprint
from ops.teacher import TeacherEmbed

TEXTS = ["Vitamin D deficiency raises the risk of fractures.", "A short one.", "",
         "Microglia respond to injury in the central nervous system within minutes of a lesion."]  # fmt: skip


def test_a_changed_file_length_precision_or_prompt_is_another_key(tmp_path, minilm_path):
    model = tmp_path / "model"
    shutil.copytree(minilm_path, model)
    (model / "training_state").mkdir()
    (model / "training_state" / "optimizer.json").write_text("{}")  # beside the model: not part of the key
    fingerprint = model_fingerprint(model)
    assert fingerprint == model_fingerprint(minilm_path)
    cache = EmbeddingCache(tmp_path / "cache", fingerprint, 256, "cpu-fp32")
    emb = np.arange(8, dtype=np.float32).reshape(4, 2)
    cache.store(TEXTS, emb)
    found, missing = EmbeddingCache(tmp_path / "cache", fingerprint, 256, "cpu-fp32").lookup(TEXTS[::-1] + ["new"])
    assert missing == [4] and all(np.array_equal(found[i], emb[3 - i]) for i in range(4))
    for other in ({"max_length": 128}, {"precision": "cuda-bf16"}, {"prompt": "search_query: "}):
        settings = {"max_length": 256, "precision": "cpu-fp32", **other}
        assert EmbeddingCache(tmp_path / "cache", fingerprint, **settings).lookup(TEXTS)[1] == [0, 1, 2, 3]
    with (model / "1_Pooling" / "config.json").open("a") as handle:
        handle.write(" ")  # any file of the model, not only the weights
    assert model_fingerprint(model) != fingerprint
    with pytest.raises(ValueError, match="4 texts but 3 embeddings"):
        cache.store(TEXTS, emb[:3])


def test_the_evaluation_reads_what_the_teacher_encoded(tmp_path, minilm_path, monkeypatch):
    """The same model, length and precision: the evaluation's encoder computes nothing the teacher already did,
    and gets the vectors it would have computed."""
    teacher = TeacherEmbed(str(minilm_path), ["text"], max_length=128, batch_size=8, embedding_cache=str(tmp_path))
    normalised = teacher.encode(TEXTS[:3])
    encoder = load_encoder(ModelSpec(str(minilm_path), max_length=128))
    expected = encoder.raw(TEXTS)
    encoder.clear_cache()
    encoder.embedding_cache = str(tmp_path)
    computed = []
    original = encoder._raw
    monkeypatch.setattr(encoder, "_raw", lambda texts, task: (computed.append(list(texts)), original(texts, task))[1])
    np.testing.assert_allclose(encoder.raw(TEXTS), expected, atol=1e-5)
    assert computed == [TEXTS[3:]]  # only the text the teacher never saw
    np.testing.assert_allclose(normalised, expected[:3] / np.linalg.norm(expected[:3], axis=1, keepdims=True),
                               atol=1e-3)  # fmt: skip  (the teacher hands float16 downstream; the cache keeps fp32)


def test_cpu_bf16_evaluation_is_close_to_fp32_and_cached_apart(tmp_path, minilm_path):
    fp32 = load_encoder(ModelSpec(str(minilm_path), max_length=128))
    bf16 = load_encoder(ModelSpec(str(minilm_path), max_length=128, cpu_bf16=True))
    assert (fp32.precision, bf16.precision) == ("cpu-fp32", "cpu-bf16")  # another cache key, never a stale hit
    cosine = (fp32.encode(TEXTS[:2]) * bf16.encode(TEXTS[:2])).sum(-1)
    assert cosine.min() > 0.999


def test_a_bf16_teacher_fills_the_bf16_evaluations_cache_only(tmp_path, minilm_path, monkeypatch):
    """teacher.cpu_bf16 embeds under bf16 autocast and stores under the key the cpu_bf16 evaluation reads."""
    teacher = TeacherEmbed(str(minilm_path), ["text"], max_length=128, batch_size=8, embedding_cache=str(tmp_path),
                           cpu_bf16=True)  # fmt: skip
    assert teacher.cache.settings["precision"] == "cpu-bf16"
    bf16_rows = teacher.encode(TEXTS[:2]).astype(np.float32)
    fp32_rows = TeacherEmbed(str(minilm_path), ["text"], max_length=128).encode(TEXTS[:2]).astype(np.float32)
    assert (bf16_rows * fp32_rows).sum(-1).min() > 0.999 and not np.array_equal(bf16_rows, fp32_rows)
    for cpu_bf16, expected in ((True, []), (False, [TEXTS[:2]])):
        encoder = load_encoder(ModelSpec(str(minilm_path), max_length=128, cpu_bf16=cpu_bf16))
        encoder.embedding_cache = str(tmp_path)
        computed = []
        original = encoder._raw
        monkeypatch.setattr(encoder, "_raw", lambda texts, task: (computed.append(list(texts)), original(texts, task))[1])
        encoder.raw(TEXTS[:2])
        assert computed == expected
