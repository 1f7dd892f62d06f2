"""GPU-only checks (skipped without CUDA; `make gpu-check` runs them): kernel parity under bf16 autocast, the kernel
the dispatcher chose, one step of each trainer on CUDA without host synchronisation, compiled blocks on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sync_audit import SyncAudit
from test_fast_path import audited
from test_model import sharpen
from train_helpers import stage_config

from nomicbert import NomicBertConfig, NomicBertForPreTraining, NomicBertModel, Segments
from nomicbert.attention import backend_choices, reset_backend_choices, unavailable_reason
from nomicbert.checkpoint import save_pretrained
from nomicbert.embed import Embedder
from nomicbert.model import masked_tokens
from nomicbert.tokenizer import load_tokenizer
from workflows import contrastive, finetune, matryoshka, mlm
from workflows.session import Session

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
SMALL = NomicBertConfig(hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_hidden_layers=2)


def runnable(backend: str) -> bool:
    probe = torch.zeros(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    return unavailable_reason(backend, probe, probe, probe) is None


@pytest.mark.parametrize("path", ["packed", "masked-lm", "ntk"])
@pytest.mark.parametrize("backend", ["flash", "varlen", "sdpa"])
def test_kernels_under_bf16_autocast_match_the_fp32_reference(backend, path):
    """Each kernel under autocast is within 3x of the eager kernel's own bf16 error against the fp32 eager path."""
    if not runnable(backend):
        pytest.skip(f"{backend} cannot run here")
    torch.manual_seed(10)
    config = NomicBertConfig(num_hidden_layers=2)
    if path == "ntk":
        config = config.replace(rotary_scaling_factor=2.0, max_trained_positions=256)
    lengths = [500, 300, 100]
    ids = torch.randint(1000, 30000, (sum(lengths),), device="cuda")
    segments = Segments.from_lengths(lengths, "cuda")
    if path == "masked-lm":
        model = sharpen(NomicBertForPreTraining(config)).cuda().eval()
        labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.3, ids, torch.full_like(ids, -100))
        positions, targets = masked_tokens(labels)

        def forward():
            return model.forward_packed(ids, segments, positions, targets).logits.float()

        encoder = model.bert
    else:
        model = encoder = sharpen(NomicBertModel(config)).cuda().eval()

        def forward():
            return model.forward_packed(ids, segments).float()

    with torch.no_grad():
        encoder.attn_backend = "eager"
        exact = forward()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            reference = forward()
            encoder.attn_backend = backend
            fast = forward()
    reference_error, error = (reference - exact).abs().max(), (fast - exact).abs().max()
    print(f"{backend} {path}: max abs error {error:.3g} vs eager-bf16 {reference_error:.3g}")
    assert error <= 3 * reference_error


def test_auto_takes_a_padding_free_kernel_under_autocast(caplog):
    if not (runnable("flash") or runnable("varlen")):
        pytest.skip("neither flash-attn nor torch's varlen kernel is available here")
    reset_backend_choices()
    model = NomicBertModel(SMALL).cuda()
    ids, segments = torch.randint(1000, 30000, (300,), device="cuda"), Segments.from_lengths([200, 100], "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        model.forward_packed(ids, segments)
    (choice,) = backend_choices()
    print(f"auto under bf16 autocast -> {choice.chosen} ({choice.reason or 'first choice'})")
    assert choice.chosen in ("flash", "varlen") and choice.dtype == "torch.bfloat16"
    assert not any(r.levelname == "WARNING" for r in caplog.records)


def test_compiled_blocks_on_cuda_equal_eager():
    torch.manual_seed(0)
    eager = NomicBertModel(SMALL).cuda().eval()
    compiled = NomicBertModel(SMALL).cuda().eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    for lengths in ([120, 50], [7, 33, 64, 300]):
        ids, segments = torch.randint(1000, 30000, (sum(lengths),), device="cuda"), Segments.from_lengths(lengths, "cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            torch.testing.assert_close(compiled.forward_packed(ids, segments).float(),
                                       eager.forward_packed(ids, segments).float(), atol=3e-2, rtol=3e-2)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# One step of each trainer on CUDA, under torch's sync debug mode
# ---------------------------------------------------------------------------------------------------------
def cuda_run(**overrides) -> dict:
    return {"run.use_gpu": True, "run.precision": "bf16", "run.log_every": 2, "run.checkpoint_every": 3, **overrides}


def mlm_batches(rows: int, length: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (rows, length))
    labels = np.where(rng.random((rows, length)) < 0.3, ids, -100)
    doc_lengths = np.empty(rows, dtype=object)
    doc_lengths[:] = [[length // 2, length - length // 2]] * rows
    return [{"row_id": np.arange(i, i + 4), "input_ids": ids[i : i + 4], "labels": labels[i : i + 4],
             "doc_lengths": doc_lengths[i : i + 4]} for i in range(0, rows, 4)]  # fmt: skip


def test_masked_lm_steps_on_cuda_never_wait(tmp_path, monkeypatch):
    cfg = stage_config(mlm.MLMConfig, "mlm", tmp_path, data=str(tmp_path), output_dir=str(tmp_path / "out"),
                       model="tiny", model_overrides={"hidden_size": 256, "num_attention_heads": 4,
                                                      "intermediate_size": 1024}, global_batch=4, micro_batch=2,
                       attend_across_documents=False, **cuda_run())  # fmt: skip
    reset_backend_choices()
    audit = audited(monkeypatch, "cuda")
    audit.allow(mlm, "build_model", monkeypatch)
    audit.allow(Session, "prepare", monkeypatch)
    with audit.run(monkeypatch):
        result = mlm.train(cfg, iter(mlm_batches(16, 256)), Session.local(tmp_path / "ckpt", "cuda"), total_steps=3)
    print("mlm:", result, [(c.requested, c.chosen) for c in backend_choices()])
    assert audit.unexpected == [], "\n".join(audit.unexpected)
    assert np.isfinite(result["loss"]) and result["step"] == 3


@pytest.mark.parametrize("stage", ["contrastive", "finetune", "matryoshka"])
def test_embedding_stage_steps_on_cuda_never_wait(stage, tmp_path, monkeypatch):
    cls = {"contrastive": contrastive.ContrastiveConfig, "finetune": finetune.FinetuneConfig,
           "matryoshka": matryoshka.MatryoshkaConfig}[stage]  # fmt: skip
    init = tmp_path / "init"
    save_pretrained(NomicBertModel(SMALL), init, load_tokenizer())
    negatives = 0 if stage == "contrastive" else 3
    extra = {"matryoshka_dims": [256, 128, 64], "matryoshka_weights": [1.0, 1.0, 1.0]} if stage == "matryoshka" else {}
    cfg = stage_config(cls, stage, tmp_path, data=str(tmp_path), init_checkpoint=str(init),
                       output_dir=str(tmp_path / "out"), global_batch=16, num_negatives=negatives,
                       grad_cache_chunk="auto", **extra, **cuda_run())  # fmt: skip
    rng = np.random.default_rng(0)
    words = ["rotary", "attention", "packed", "sequence", "model", "query", "document", "negative", "batch", "kernel"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words, n))

    batches = []
    for index in range(3):
        batch = {"row_id": np.arange(16) + 16 * index, "query": np.array([text(8) for _ in range(16)]),
                 "document": np.array([text(120) for _ in range(16)])}  # fmt: skip
        if negatives:
            batch["negatives"] = np.array([[text(100) for _ in range(5)] for _ in range(16)], dtype=object)
        batches.append(batch)
    audit = audited(monkeypatch, "cuda")
    audit.allow(contrastive, "build_encoder", monkeypatch)
    audit.allow(contrastive, "grad_cache_chunk", monkeypatch)  # measures memory once, before the first step
    audit.allow(Session, "prepare", monkeypatch)
    with audit.run(monkeypatch):
        result = contrastive.train(cfg, iter(batches), Session.local(tmp_path / "ckpt", "cuda"), total_steps=3)
    print(f"{stage}:", result)
    assert audit.unexpected == [], "\n".join(audit.unexpected)
    assert np.isfinite(result["loss"]) and result["step"] == 3


def test_embedding_on_cuda_reads_back_once(monkeypatch):
    embedder = Embedder(NomicBertModel(SMALL), load_tokenizer(), device="cuda", batch_tokens=512)
    token_ids = embedder.tokenize(["a short text", "a somewhat longer text than that one", "x"] * 40)
    embedder.pool(token_ids)  # warm-up: kernel selection and allocator growth happen once
    audit = SyncAudit("cuda")
    with audit.run(monkeypatch):
        pooled = embedder.pool(token_ids)
    assert pooled.shape == (120, 256) and torch.isfinite(pooled).all()
    assert len(audit.unexpected) <= 1, "\n".join(audit.unexpected)  # the one copy of the result
