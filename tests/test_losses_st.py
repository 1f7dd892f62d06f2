"""Oracle tests against the peer users know: on the same `transformers` model and batch, our contrastive loss
with hard negatives equals sentence-transformers' MultipleNegativesRankingLoss, and our gradient cache equals
its CachedMultipleNegativesRankingLoss, in value and in every parameter gradient (fp32, <= 1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nomicbert.encoders import load_encoder
from nomicbert.losses import ContrastiveLoss, GradCache

SCALE = 20.0  # MNRL's documented default; ours takes the same value as logit_scale
QUERIES = ["what lowers blood pressure?", "rotary position embeddings", "how do bees see colour",
           "vitamin d and infections"]  # fmt: skip
POSITIVES = ["Salt reduction lowers blood pressure in most adults.", "RoPE rotates query and key vectors by position.",
             "Bees have ultraviolet photoreceptors.", "Supplementation reduced respiratory infections in trials."]
NEGATIVES = [  # two hard negatives per query, column j = the j-th negative of every query
    ["Blood donation is safe for most adults.", "Attention heads rotate slowly.", "Bees make honey in summer.",
     "Vitamin C is found in citrus fruit and in many vegetables grown in gardens."],
    ["Exercise changes heart rate.", "Absolute position embeddings are learned.", "Wasps are not bees.",
     "Infections spread in winter."],
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, shared_data) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("oracle_bert")
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(str(folder))  # fmt: skip
    tokenizer = BertTokenizerFast(vocab=str(shared_data / "bert-base-uncased-vocab" / "vocab.txt"), do_lower_case=True)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(str(folder))
    return folder


def ours(folder: Path, chunk: int | None) -> tuple[float, dict[str, torch.Tensor]]:
    """Our encoder + ContrastiveLoss (documents query-major: [positive, negative_1, negative_2] per query)."""
    encoder = load_encoder(folder).eval()  # dropout off on both sides: the same function, deterministic
    q_ids = encoder.tokenize(QUERIES)
    documents = [d for i, p in enumerate(POSITIVES) for d in (p, NEGATIVES[0][i], NEGATIVES[1][i])]
    d_ids = encoder.tokenize(documents)
    loss_fn = ContrastiveLoss(logit_scale=SCALE, stride=3)
    if chunk:
        loss = GradCache(chunk).step(encoder, [q_ids, d_ids], loss_fn)
    else:
        pooled = encoder(q_ids + d_ids)
        loss = loss_fn(pooled[: len(q_ids)], pooled[len(q_ids) :])
        loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in encoder.model.named_parameters() if p.grad is not None}


def sentence_transformers(folder: Path, cached: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """sentence-transformers on the same folder: columns (anchor, positive, negative_1, negative_2)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

    model = SentenceTransformer(str(folder), device="cpu").eval()
    loss_fn = (CachedMultipleNegativesRankingLoss(model, scale=SCALE, mini_batch_size=2) if cached
               else MultipleNegativesRankingLoss(model, scale=SCALE))  # fmt: skip
    features = [model.preprocess(column) for column in (QUERIES, POSITIVES, *NEGATIVES)]
    loss = loss_fn(features, torch.zeros(len(QUERIES)))
    loss.backward()
    transformer = model[0].auto_model
    return float(loss.detach()), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cached", [False, True], ids=["MNRL", "CachedMNRL"])
def test_contrastive_loss_equals_sentence_transformers(tiny_bert, cached):
    loss, grads = ours(tiny_bert, chunk=3 if cached else None)
    peer_loss, peer_grads = sentence_transformers(tiny_bert, cached)
    assert loss == pytest.approx(peer_loss, abs=1e-5)
    assert loss > 0.5  # a real loss: random embeddings do not separate the 12 documents
    assert set(grads) == set(peer_grads) and len(grads) > 30
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peer_grads[name], atol=1e-5, rtol=0, msg=f"gradient of {name}")
    assert max(g.abs().max() for g in grads.values()) > 1e-3  # the gradients compared are not all ~0
