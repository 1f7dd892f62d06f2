"""NomicBERT against transformers' native NomicBert, checkpoint round trips, packing, backends, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nomicbert import NomicBertConfig, NomicBertForPreTraining, NomicBertModel, Segments, count_parameters
from nomicbert.__main__ import main as cli_main
from nomicbert.checkpoint import (
    CheckpointError,
    export_all,
    hf_to_nomic,
    load_model,
    nomic_to_hf,
    save_pretrained,
)
from nomicbert.config import tiny
from nomicbert.embed import Embedder, finalize, mean_pool
from nomicbert.model import masked_tokens, ntk_base
from nomicbert.tokenizer import load_tokenizer


def reference_model(config: NomicBertConfig, ours: torch.nn.Module) -> transformers.NomicBertModel:
    """transformers' NomicBertModel with our weights (a fresh instance: its NTK table is stateful)."""
    raw = config.to_hf_dict()  # rope_parameters: dynamic NTK with the factor when it is set
    raw.pop("model_type"), raw.pop("architectures")
    reference = transformers.NomicBertModel(transformers.NomicBertConfig(**raw)).eval()
    reference.load_state_dict(nomic_to_hf(ours.state_dict()), strict=True)
    return reference


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Scale the q/k/v weights up: N(0, 0.02) init gives near-uniform attention, which hides position bugs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("Wqkv.weight"):
                param.mul_(10)
    return model


def random_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(1000, 30000, (len(lengths), S), generator=g)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_hidden_states_match_transformers_on_padded_batches(backend):
    torch.manual_seed(0)
    config = tiny()
    ours = sharpen(NomicBertModel(config, attn_backend=backend)).eval()
    ids, mask = random_batch([40, 17, 3, 33])
    with torch.no_grad():
        got = ours(ids, mask)
        want = reference_model(config, ours)(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (got[keep] - want[keep]).abs().max() <= 1e-5


def test_ntk_beyond_trained_length_matches_transformers():
    """NTK on, padded length 150 > trained 64: the reference's padded-length rule reproduces transformers."""
    torch.manual_seed(1)
    config = tiny(rotary_scaling_factor=2.0, ntk_length="batch")
    ours = sharpen(NomicBertModel(config, attn_backend="eager")).eval()
    ids, mask = random_batch([150, 90, 150])
    with torch.no_grad():
        got = ours(ids, mask)
        want = reference_model(config, ours)(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (got[keep] - want[keep]).abs().max() <= 1e-5
    # and the scaling really changed something: without NTK the outputs differ
    plain = NomicBertModel(tiny(), attn_backend="eager").eval()
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (plain(ids, mask)[keep] - got[keep]).abs().max() > 1e-3


def test_ntk_per_sequence_is_independent_of_batch_mates():
    """Default rule: L is each sequence's own length, so an embedding never depends on its batch."""
    torch.manual_seed(2)
    model = sharpen(NomicBertModel(tiny(rotary_scaling_factor=2.0), attn_backend="sdpa")).eval()
    ids, mask = random_batch([100, 150])
    with torch.no_grad():
        together = model(ids, mask)
        alone = model(ids[:1, :100], mask[:1, :100])
        reference = reference_model(model.config.replace(ntk_length="batch"), model)
        want = reference(input_ids=ids[:1, :100], attention_mask=mask[:1, :100]).last_hidden_state
    assert (together[0, :100] - alone[0]).abs().max() <= 1e-5
    assert (alone - want).abs().max() <= 1e-5


def test_ntk_base_formula_matches_published_values():
    config = NomicBertConfig(rotary_scaling_factor=2.0)
    assert ntk_base(config, 2048) == 1000.0
    assert ntk_base(config, 2049) == pytest.approx(1001.0, abs=0.05)
    assert ntk_base(config, 4096) == pytest.approx(3108.2, abs=0.05)
    assert ntk_base(config, 8192) == pytest.approx(7453.5, abs=0.05)


def test_packed_path_equals_padded_path():
    torch.manual_seed(3)
    model = NomicBertModel(tiny(), attn_backend="sdpa").eval()
    lengths = [12, 30, 5, 21]
    ids, mask = random_batch(lengths)
    packed_ids = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])
    with torch.no_grad():
        padded = model(ids, mask)
        packed = model.forward_packed(packed_ids, Segments.from_lengths(lengths))
    assert (packed - padded[mask.bool()]).abs().max() <= 1e-5


def test_backends_agree_on_cpu():
    """The fast path (SDPA kernels) must not drift from the textbook path."""
    torch.manual_seed(4)
    model = NomicBertModel(tiny()).eval()
    ids = torch.randint(1000, 30000, (70,))
    segments = Segments.from_lengths([20, 50])
    outputs = {}
    for backend in ("eager", "sdpa", "auto"):
        model.attn_backend = backend
        with torch.no_grad():
            outputs[backend] = model.forward_packed(ids, segments)
    assert (outputs["sdpa"] - outputs["eager"]).abs().max() <= 1e-5
    assert (outputs["auto"] - outputs["eager"]).abs().max() <= 1e-5


def test_documents_in_one_row_kept_apart_or_attending():
    """A packed row as one segment (reference MLM) differs from one segment per document."""
    torch.manual_seed(5)
    model = sharpen(NomicBertModel(tiny())).eval()
    ids = torch.randint(1000, 30000, (48,))
    with torch.no_grad():
        row = model.forward_packed(ids, Segments.from_lengths([48]))
        apart = model.forward_packed(ids, Segments.from_lengths([20, 28]))
        first_alone = model.forward_packed(ids[:20], Segments.from_lengths([20]))
    assert (apart[:20] - first_alone).abs().max() <= 1e-5
    assert (row[:20] - apart[:20]).abs().max() > 1e-3


def test_parameter_counts_match_the_published_model():
    model = NomicBertForPreTraining(NomicBertConfig())
    assert count_parameters(model.bert) == 136_731_648
    assert count_parameters(model) == 137_323_008


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(6)
    model = NomicBertForPreTraining(tiny()).eval()
    save_pretrained(model, tmp_path / "mlm", load_tokenizer())
    keys = set(load_file(tmp_path / "mlm" / "model.safetensors"))
    assert "bert.encoder.layers.0.attn.Wqkv.weight" in keys and "cls.predictions.transform.dense.weight" in keys
    loaded = load_model(tmp_path / "mlm", kind="mlm").eval()
    ids, mask = random_batch([20, 9])
    with torch.no_grad():
        assert torch.equal(model(ids, mask), loaded(ids, mask))
    # the encoder alone loads from the masked-LM checkpoint (contrastive init)
    encoder = load_model(tmp_path / "mlm", kind="encoder").eval()
    with torch.no_grad():
        assert torch.equal(encoder(ids, mask), model.bert(ids, mask))


def test_strict_loading_names_the_bad_keys(tmp_path):
    model = NomicBertModel(tiny())
    folder = save_pretrained(model, tmp_path / "enc")
    state = load_file(folder / "model.safetensors")
    state["encoder.layers.0.mlp.fc3.weight"] = torch.zeros(2)
    del state["encoder.layers.1.norm2.bias"]
    state["emb_ln.weight"] = torch.ones(7)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    message = str(err.value)
    assert "encoder.layers.0.mlp.fc3.weight" in message
    assert "encoder.layers.1.norm2.bias" in message
    assert "emb_ln.weight" in message and "(7,)" in message
    with pytest.raises(CheckpointError, match="masked-LM head"):
        save_pretrained(NomicBertModel(tiny()), tmp_path / "enc2")
        load_model(tmp_path / "enc2", kind="mlm")


def test_key_maps_fail_on_unknown_keys_and_round_trip():
    model = NomicBertForPreTraining(tiny())
    state = {k: v for k, v in model.state_dict().items() if k != "cls.predictions.decoder.weight"}
    back = hf_to_nomic(nomic_to_hf(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match="bert.encoder.layers.0.attn.rotary"):
        nomic_to_hf({**state, "bert.encoder.layers.0.attn.rotary.inv_freq": torch.zeros(1)})
    hf = nomic_to_hf(state)
    hf["cls.predictions.bias"] = torch.ones_like(hf["cls.predictions.bias"])
    with pytest.raises(CheckpointError, match="cls.predictions.bias"):
        hf_to_nomic(hf)


def test_tokenizer_gives_bert_base_uncased_ids():
    tokenizer = load_tokenizer()
    assert tokenizer("Hello world, tokenization!")["input_ids"] == [101, 7592, 2088, 1010, 19204, 3989, 999, 102]
    assert tokenizer.model_max_length == 8192


def test_cli_embeds_a_transformers_native_folder(tmp_path):
    """A folder written by transformers' own save_pretrained: same as mean pooling its own output."""
    torch.manual_seed(7)
    config = tiny()
    native = reference_model(config, NomicBertModel(config))
    native.save_pretrained(tmp_path / "native")
    tokenizer = load_tokenizer()
    tokenizer.save_pretrained(tmp_path / "native")
    texts = ["the quick brown fox", "rotary positions extend to long context", "a"]
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    cli_main(["embed", "--model", str(tmp_path / "native"), "--input", str(tmp_path / "texts.jsonl"),
              "--output", str(tmp_path / "v1.npy"), "--task", "search_query", "--device", "cpu"])  # fmt: skip
    cli_main(["embed", "--model", str(tmp_path / "native"), "--input", str(tmp_path / "texts.jsonl"),
              "--output", str(tmp_path / "d64.npy"), "--task", "search_query", "--dim", "64", "--device", "cpu"])  # fmt: skip
    batch = tokenizer(["search_query: " + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = native(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    pooled = mean_pool(hidden, batch["attention_mask"])
    v1 = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    v15 = finalize(pooled, "v1.5", dim=64).numpy()
    got_v1, got_v15 = np.load(tmp_path / "v1.npy"), np.load(tmp_path / "d64.npy")
    assert got_v1.dtype == np.float32 and got_v1.shape == (3, 64)
    np.testing.assert_allclose(got_v1, v1, atol=1e-5)
    np.testing.assert_allclose(got_v15, v15, atol=1e-5)


def test_exports_load_in_transformers_and_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(8)
    model = NomicBertModel(tiny(embedding_recipe="v1.5")).eval()
    tokenizer = load_tokenizer()
    folder = export_all(model, tmp_path / "ckpt", tokenizer)
    texts = ["a first document", "and a second, longer one about embeddings"]
    ours = Embedder(model, tokenizer).encode(texts, task="search_document")
    native = transformers.AutoModel.from_pretrained(folder / "hf").eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(batch["input_ids"], batch["attention_mask"])
        got = native(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert (got[keep] - want[keep]).abs().max() <= 1e-5
    st = SentenceTransformer(str(folder / "st"), device="cpu")
    st_vectors = st.encode(texts, prompt_name="search_document", convert_to_numpy=True)
    np.testing.assert_allclose(st_vectors, ours, atol=1e-5)


def test_tiny_masked_lm_learns_on_real_text(shared_data):
    """50 CPU steps on real Wikipedia text: the masked-LM loss falls."""
    torch.manual_seed(9)
    tokenizer = load_tokenizer()
    text = (shared_data / "mlm_corpus" / "wikipedia_en_sample.txt").read_text()[:200_000]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: 64 * 32])
    rows = ids.view(32, 64)
    model = NomicBertForPreTraining(tiny(hidden_size=64, max_trained_positions=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    g = torch.Generator().manual_seed(0)
    for step in range(50):
        batch = rows[(step * 8) % 32 : (step * 8) % 32 + 8].reshape(-1)
        masked = torch.rand(batch.shape, generator=g) < 0.3
        labels = torch.where(masked, batch, torch.full_like(batch, -100))
        inputs = torch.where(masked, torch.full_like(batch, 103), batch)
        out = model.forward_packed(inputs, Segments.from_lengths([64] * 8), *masked_tokens(labels))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0


def test_unavailable_backends_fail_clearly_on_cpu():
    model = NomicBertModel(tiny()).eval()
    ids, segments = torch.randint(1000, 30000, (10,)), Segments.from_lengths([10])
    for backend, needs in (("flash", "flash-attn"), ("varlen", "CUDA")):
        model.attn_backend = backend
        with pytest.raises(RuntimeError, match=needs):
            model.forward_packed(ids, segments)
    model.attn_backend = "cudnn-magic"
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.forward_packed(ids, segments)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only kernels")
@pytest.mark.parametrize("backend", ["varlen", "flash", "sdpa"])
def test_gpu_kernels_match_the_fp32_reference(backend):
    from nomicbert.attention import flash_available, torch_varlen_available

    probe = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    if (backend == "flash" and not flash_available(probe)) or (backend == "varlen" and not torch_varlen_available(probe)):
        pytest.skip(f"{backend} not installed")
    torch.manual_seed(10)
    model = sharpen(NomicBertModel(NomicBertConfig(num_hidden_layers=2))).cuda().eval()
    ids, segments = torch.randint(1000, 30000, (900,), device="cuda"), Segments.from_lengths([500, 300, 100], "cuda")
    with torch.no_grad():
        model.attn_backend = "eager"
        exact = model.forward_packed(ids, segments)
        reference_bf16 = model.to(torch.bfloat16).forward_packed(ids, segments).float()
        model.attn_backend = backend
        fast = model.forward_packed(ids, segments).float()
    assert (fast - exact).abs().max() <= 3 * (reference_bf16 - exact).abs().max()
