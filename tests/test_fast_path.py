"""The fast path, checked on a CPU: one compute dtype at attention under autocast, the backend the dispatcher chose,
no host synchronisation inside a training or embedding step, compiled == eager, packed query/document streams."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sync_audit import SyncAudit
from train_helpers import local_mlm_batches, make_mlm_data, make_pairs, pair_rows, stage_config

import nomicbert.model
from nomicbert import NomicBertConfig, NomicBertForPreTraining, NomicBertModel, Segments
from nomicbert.attention import backend_choices, reset_backend_choices
from nomicbert.checkpoint import save_pretrained
from nomicbert.config import tiny
from nomicbert.embed import Embedder, mean_pool_packed
from nomicbert.encoders import NomicEncoder
from nomicbert.losses import ContrastiveLoss
from nomicbert.model import masked_tokens
from nomicbert.tokenizer import load_tokenizer
from workflows import contrastive, loop, mlm
from workflows.optimization import OptimizerStep
from workflows.session import Session


@pytest.fixture()
def attention_dtypes(monkeypatch) -> list[tuple[torch.dtype, ...]]:
    """The dtypes of q, k and v at every attention call."""
    seen: list[tuple[torch.dtype, ...]] = []
    original = nomicbert.model.varlen_attention

    def spy(q, k, v, segments, backend):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original(q, k, v, segments, backend)

    monkeypatch.setattr(nomicbert.model, "varlen_attention", spy)
    return seen


NTK = {"rotary_scaling_factor": 2.0, "max_trained_positions": 32}


@pytest.mark.parametrize("path", ["padded", "packed", "masked-lm", "ntk-per-sequence", "ntk-batch"])
def test_q_k_v_share_the_compute_dtype_under_autocast(path, attention_dtypes):
    config = tiny().replace(**(NTK if path.startswith("ntk") else {}),
                            **({"ntk_length": "batch"} if path == "ntk-batch" else {}))  # fmt: skip
    lengths = [80, 20] if path.startswith("ntk") else [20, 7]
    ids = torch.randint(1000, 30000, (sum(lengths),))
    segments = Segments.from_lengths(lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        if path == "padded":
            mask = (torch.arange(20)[None, :] < torch.tensor(lengths)[:, None]).long()
            NomicBertModel(config)(torch.randint(1000, 30000, (2, 20)) * mask, mask)
        elif path == "masked-lm":
            labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
            NomicBertForPreTraining(config).forward_packed(ids, segments, *masked_tokens(labels))
        else:
            NomicBertModel(config).forward_packed(ids, segments)
    assert attention_dtypes and all(d == (torch.bfloat16,) * 3 for d in attention_dtypes), attention_dtypes


def test_the_dispatcher_records_and_logs_its_choice(caplog):
    reset_backend_choices()
    model = NomicBertModel(tiny()).eval()
    ids, segments = torch.randint(1000, 30000, (30,)), Segments.from_lengths([20, 10])
    with caplog.at_level(logging.INFO, logger="nomicbert.attention"), torch.no_grad():
        for backend in ("auto", "auto", "eager", "sdpa"):
            model.attn_backend = backend
            model.forward_packed(ids, segments)
    chosen = {(c.requested, c.chosen) for c in backend_choices()}
    assert chosen == {("auto", "sdpa"), ("eager", "eager"), ("sdpa", "sdpa")}
    auto = next(c for c in backend_choices() if c.requested == "auto")
    assert "needs CUDA" in auto.reason and auto.device == "cpu" and auto.dtype == "torch.float32"
    assert sum("attention backend auto" in r.getMessage() for r in caplog.records) == 1  # once, not per layer


@pytest.mark.parametrize("backend, reason", [("flash", "flash-attn|needs CUDA"), ("varlen", "needs CUDA")])
def test_an_explicit_backend_that_cannot_run_names_the_reason(backend, reason):
    model = NomicBertModel(tiny()).eval()
    model.attn_backend = backend
    with pytest.raises(RuntimeError, match=rf"attention backend '{backend}' cannot run: .*({reason})"):
        model.forward_packed(torch.randint(1000, 30000, (10,)), Segments.from_lengths([10]))


# ---------------------------------------------------------------------------------------------------------
# No host synchronisation inside a step
# ---------------------------------------------------------------------------------------------------------
def audited(monkeypatch, device_type: str = "cpu") -> SyncAudit:
    """A SyncAudit that expects waits only in the loop's periodic read, the skip-counter check and checkpoints."""
    audit = SyncAudit(device_type)
    audit.allow(loop, "read", monkeypatch)
    audit.allow(OptimizerStep, "check", monkeypatch)
    audit.allow(OptimizerStep, "check_weights", monkeypatch)
    audit.allow(loop, "full_state", monkeypatch)
    audit.allow(loop, "write_checkpoint", monkeypatch)
    return audit


def test_a_masked_lm_step_never_waits_for_the_device(tmp_path, shared_data, monkeypatch):
    data = make_mlm_data(shared_data, tmp_path / "mlm-data", rows=16, row_length=32)
    cfg = stage_config(mlm.MLMConfig, "mlm", tmp_path, data=str(data), output_dir=str(tmp_path / "out"), model="tiny",
                       model_overrides={}, global_batch=4, micro_batch=2, attend_across_documents=False,
                       **{"run.log_every": 3, "run.checkpoint_every": 6})  # fmt: skip
    audit = audited(monkeypatch)
    with audit.run(monkeypatch):
        mlm.train(cfg, iter(local_mlm_batches(data, 4)), Session.local(tmp_path / "ckpt", device="cpu"), total_steps=4)
    assert audit.unexpected == [], "\n".join(audit.unexpected)
    assert audit.allowed["read"] == 2 and audit.allowed["check"] == 2  # steps 3 and 4 (the last) only


@pytest.mark.parametrize("grad_cache_chunk", [0, 3])
def test_a_contrastive_step_never_waits_for_the_device(tmp_path, shared_data, monkeypatch, grad_cache_chunk):
    init = tmp_path / "init"
    save_pretrained(NomicBertModel(tiny()), init, load_tokenizer())
    data = make_pairs(pair_rows(shared_data, wiki=8, snli=0), tmp_path / "pairs", negatives=False)
    cfg = stage_config(contrastive.ContrastiveConfig, "contrastive", tmp_path, data=str(data), init_checkpoint=str(init),
                       output_dir=str(tmp_path / "out"), global_batch=4, grad_cache_chunk=grad_cache_chunk,
                       **{"run.log_every": 2, "run.checkpoint_every": 10})  # fmt: skip
    rows = pair_rows(shared_data, wiki=8, snli=0)
    batches = [{"row_id": np.arange(i, i + 4), "query": np.array([r["query"] for r in rows[i : i + 4]]),
                "document": np.array([r["document"] for r in rows[i : i + 4]])} for i in (0, 4, 0)]  # fmt: skip
    audit = audited(monkeypatch)
    with audit.run(monkeypatch):
        contrastive.train(cfg, iter(batches), Session.local(tmp_path / "ckpt", device="cpu"), total_steps=3)
    assert audit.unexpected == [], "\n".join(audit.unexpected)
    assert audit.allowed["read"] == 2  # steps 2 and 3 (the last)


def test_embedding_reads_back_once_at_the_end(monkeypatch):
    embedder = Embedder(NomicBertModel(tiny()), load_tokenizer(), device="cpu", batch_tokens=64)
    token_ids = embedder.tokenize(["a short text", "a somewhat longer text than that one", "x"] * 5)
    audit = SyncAudit("cpu")
    with audit.run(monkeypatch):
        pooled = embedder.pool(token_ids)
    assert pooled.shape == (15, tiny().hidden_size)
    assert [u.split("\n")[0] for u in audit.unexpected] == ["cpu() of a device tensor"]  # the result, once


def test_the_audit_catches_a_read_from_the_device(monkeypatch):
    """The audit itself must be able to fail: ``.item()`` and a boolean mask on device values are caught."""
    model = NomicBertModel(tiny())
    audit = SyncAudit("cpu")
    with audit.run(monkeypatch):
        hidden = model.forward_packed(torch.randint(1000, 30000, (10,)), Segments.from_lengths([10]))
        hidden.sum().item()
        caught = len(audit.unexpected)
        hidden[hidden > 0].sum()
    assert caught >= 1 and audit.unexpected[0].startswith("item() of a device tensor")
    assert audit.unexpected[caught:] and audit.unexpected[caught].startswith("aten.index.Tensor")


# ---------------------------------------------------------------------------------------------------------
# torch.compile and packed streams
# ---------------------------------------------------------------------------------------------------------
def test_compiled_blocks_equal_eager_without_recompiling_per_batch(monkeypatch):
    import torch._inductor.config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no compile-worker pool to start on 2 cores
    torch.manual_seed(0)
    config = NomicBertConfig(vocab_size=30528, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=128)  # fmt: skip
    eager = NomicBertModel(config).eval()
    compiled = NomicBertModel(config).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # parameter names unchanged
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for lengths in ([20, 50], [7, 33, 64], [3, 4, 5, 6, 90]):
        ids, segments = torch.randint(1000, 30000, (sum(lengths),)), Segments.from_lengths(lengths)
        with torch.no_grad():
            torch.testing.assert_close(compiled.forward_packed(ids, segments), eager.forward_packed(ids, segments),
                                       atol=1e-5, rtol=1e-5)  # fmt: skip
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs  # new lengths and counts reuse the first graph


def test_separate_query_and_document_streams_equal_one_packed_stream():
    """The contrastive step packs queries and documents apart; the loss and every gradient equal one stream."""
    torch.manual_seed(0)
    model = NomicBertModel(tiny())
    q = [[101, 2054, 2003, 102], [101, 7592, 102]]
    d = [[101, 1037, 2146, 3793, 2055, 2009, 102], [101, 2178, 6251, 102], [101, 2023, 102], [101, 1996, 2203, 102]]
    loss_fn = ContrastiveLoss(stride=2)

    def grads_of(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    encoder = contrastive.StreamEncoder(NomicEncoder(model, load_tokenizer()), "fp32")
    streams = loss_fn(*encoder([q, d]))
    streams_grads = grads_of(streams)
    ids = torch.tensor([t for x in q + d for t in x])
    segments = Segments.from_lengths([len(x) for x in q + d])
    pooled = mean_pool_packed(model.forward_packed(ids, segments), segments)
    one = loss_fn(pooled[: len(q)], pooled[len(q) :])
    torch.testing.assert_close(streams, one, atol=1e-6, rtol=1e-6)
    for a, b in zip(streams_grads, grads_of(one)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # summation order differs between the layouts
