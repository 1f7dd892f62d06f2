"""NomicBERT: BERT-base with rotary positions (dynamic NTK), SwiGLU and post-norm blocks.

Forward semantics follow the published remote code (nomic-ai/nomic-bert-2048, ``modeling_hf_nomic_bert.py``)
and the paper (arXiv 2402.01613); parameter names equal the published checkpoint keys, so a state dict
loads strictly with no renaming. Internally every forward runs on packed variable-length tokens
(``[T, hidden]`` plus `Segments`): padding costs nothing, and the padded API is a thin wrapper.

Reading order: rotary -> attention -> MLP -> block -> embeddings -> encoder model -> heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nomicbert.attention import Backend, Segments, varlen_attention
from nomicbert.config import NomicBertConfig


# ---------------------------------------------------------------------------------------------------------
# Rotary positions with stateless dynamic NTK
# ---------------------------------------------------------------------------------------------------------
def ntk_base(config: NomicBertConfig, length: int) -> float:
    """base' = b * (a*L/T - (a-1))^(d/(d-2)) beyond the trained length T; plain b otherwise (spec §2)."""
    a, T, d = config.rotary_scaling_factor, config.max_trained_positions, config.head_dim
    if not a or length <= T:
        return config.rotary_emb_base
    return config.rotary_emb_base * ((a * length / T) - (a - 1)) ** (d / (d - 2))


def inverse_frequencies(base: float, dim: int, device: torch.device | None = None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def rotary_cos_sin(config: NomicBertConfig, segments: Segments, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos/sin at full head width, [T, 1, head_dim] in ``dtype``, computed once per forward and shared by
    every layer. The NTK length L is each sequence's own length, or with ``ntk_length="batch"`` the padded batch
    length; nothing is cached between calls and nothing is read back from the device."""
    device, d = segments.positions.device, config.head_dim
    inv_freq = inverse_frequencies(config.rotary_emb_base, d, device)[None, :]  # (1, d/2)
    scaled = config.rotary_scaling_factor and (
        segments.padded_length if config.ntk_length == "batch" else segments.max_seqlen
    ) > config.max_trained_positions
    if scaled and config.ntk_length == "batch":
        inv_freq = inverse_frequencies(ntk_base(config, segments.padded_length), d, device)[None, :]
    elif scaled:  # one base per sequence, vectorised on the device: base' where L > T, b elsewhere
        a, T, b = config.rotary_scaling_factor, config.max_trained_positions, config.rotary_emb_base
        lengths = segments.lengths.double()
        base = torch.where(lengths > T, b * ((a * lengths / T) - (a - 1)) ** (d / (d - 2)), b).float()  # (n,)
        exponents = torch.arange(0, d, 2, device=device, dtype=torch.float32) / d
        inv_freq = (1.0 / base[:, None] ** exponents)[segments.seq_index]  # (T, d/2)
    angles = segments.positions.float()[:, None] * inv_freq  # (T, d/2), fp32 as in the reference
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]  # (T, 1, d): the half split repeats the frequencies
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX half split over the full head dim. x: (T, heads, d); cos/sin: (T, 1, d) in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the linear layers produce from ``x``: autocast's when it is on (q, k, v come out of Wqkv in it), else
    ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------
class NomicBertAttention(nn.Module):
    def __init__(self, config: NomicBertConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        # rows ordered [Q(all heads) | K | V], each head's dims contiguous: the published layout
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments,
                backend: Backend) -> torch.Tensor:  # fmt: skip
        T = x.shape[0]
        q, k, v = self.Wqkv(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)  # each (T, nh, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = varlen_attention(q, k, v, segments, backend)  # (T, nh, hd)
        return self.out_proj(out.reshape(T, -1))


class NomicBertMLP(nn.Module):
    """SwiGLU: fc11 is the value path, fc12 the SiLU gate (spec §1.2)."""

    def __init__(self, config: NomicBertConfig):
        super().__init__()
        self.fc11 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc12 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc11(x) * F.silu(self.fc12(x)))


class NomicBertBlock(nn.Module):
    """Post-norm (BERT order): x = LN1(x + attn(x)); x = LN2(x + mlp(x))."""

    def __init__(self, config: NomicBertConfig):
        super().__init__()
        self.attn = NomicBertAttention(config)
        self.mlp = NomicBertMLP(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, cos, sin, segments: Segments, backend: Backend) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, cos, sin, segments, backend))
        return self.norm2(x + self.mlp(x))


class NomicBertEmbeddings(nn.Module):
    """Word + token-type embeddings; no absolute positions (rotary carries them)."""

    def __init__(self, config: NomicBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if token_type_ids is None:  # type id 0 everywhere, the common case: add row 0 without a gather
            return x + self.token_type_embeddings.weight[0]
        return x + self.token_type_embeddings(token_type_ids)


class NomicBertEncoder(nn.Module):
    def __init__(self, config: NomicBertConfig):
        super().__init__()
        self.layers = nn.ModuleList(NomicBertBlock(config) for _ in range(config.num_hidden_layers))


class NomicBertPooler(nn.Module):
    """BERT pooler (token 0 -> dense -> tanh); only the classification model has it."""

    def __init__(self, config: NomicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(first_token))


# ---------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------
class NomicBertModel(nn.Module):
    """The embedding model. Keys: ``embeddings.*``, ``emb_ln.*``, ``encoder.layers.{i}.*`` (spec §3)."""

    def __init__(self, config: NomicBertConfig, add_pooling_layer: bool = False, attn_backend: Backend = "auto"):
        super().__init__()
        self.config = config
        self.attn_backend: Backend = attn_backend
        self.embeddings = NomicBertEmbeddings(config)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = NomicBertEncoder(config)
        self.pooler = NomicBertPooler(config) if add_pooling_layer else None
        self.apply(lambda m: init_weights(m, config))

    def compile_blocks(self) -> None:
        """``torch.compile`` every encoder block in place (parameter names unchanged, so checkpoints and FSDP units
        stay as they are), with dynamic shapes: packed batches of any total and longest length share one graph."""
        for layer in self.encoder.layers:
            layer.compile(dynamic=True)

    def forward_packed(self, input_ids: torch.Tensor, segments: Segments,
                       token_type_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """input_ids: [T] tokens of all sequences back to back -> hidden states [T, hidden]."""
        x = self.emb_ln(self.embeddings(input_ids, token_type_ids))
        cos, sin = rotary_cos_sin(self.config, segments, compute_dtype(x))
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, segments, self.attn_backend)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Right-padded [B, S] batch -> last hidden state [B, S, hidden] (zeros at padding)."""
        B, S = input_ids.shape
        keep, segments = unpad(input_ids, attention_mask)
        types = token_type_ids[keep] if token_type_ids is not None else None
        hidden = self.forward_packed(input_ids[keep], segments, types)
        out = hidden.new_zeros(B, S, hidden.shape[-1])
        out[keep] = hidden
        return out


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Segments]:
    """Right-padded batch -> (boolean mask of real tokens, Segments). Left padding is refused: rotary
    positions must start at 0 on the first real token."""
    B, S = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    expected = torch.arange(S, device=keep.device)[None, :] < lengths[:, None]
    if not torch.equal(keep, expected):
        raise ValueError("attention_mask must be right-padded (1s followed by 0s on every row)")
    if int(lengths.min()) == 0:
        raise ValueError("every row of attention_mask needs at least one real token")
    return keep, Segments.from_lengths(lengths, device=input_ids.device, padded_length=S)


def init_weights(module: nn.Module, config: NomicBertConfig) -> None:
    """N(0, 0.02) for Linear and Embedding, zero biases and padding row, LayerNorm 1/0 (spec §1.6)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=config.initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=config.initializer_range)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------
class NomicBertPredictionHeadTransform(nn.Module):
    def __init__(self, config: NomicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(F.silu(self.dense(x)))  # SiLU because the activation is "swiglu"


class NomicBertLMPredictionHead(nn.Module):
    def __init__(self, config: NomicBertConfig):
        super().__init__()
        self.transform = NomicBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # tied to word embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class NomicBertPreTrainingHeads(nn.Module):
    def __init__(self, config: NomicBertConfig):
        super().__init__()
        self.predictions = NomicBertLMPredictionHead(config)


@dataclass
class MaskedLMOutput:
    loss: torch.Tensor  # mean cross-entropy over masked positions
    logits: torch.Tensor  # [M, vocab] for the M masked positions only
    labels: torch.Tensor  # [M] their targets

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.logits.argmax(-1) == self.labels).float().mean()


class NomicBertForPreTraining(nn.Module):
    """nomic-bert-2048: encoder under ``bert.`` plus the masked-LM head ``cls.predictions.*``."""

    def __init__(self, config: NomicBertConfig, attn_backend: Backend = "auto"):
        super().__init__()
        self.config = config
        self.bert = NomicBertModel(config, attn_backend=attn_backend)
        self.cls = NomicBertPreTrainingHeads(config)
        self.cls.apply(lambda m: init_weights(m, config))
        if config.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward_packed(self, input_ids: torch.Tensor, segments: Segments, masked_positions: torch.Tensor,
                       masked_labels: torch.Tensor,
                       token_type_ids: torch.Tensor | None = None) -> MaskedLMOutput:  # fmt: skip
        """Loss on the M masked tokens only: the head runs on them, not on all T. ``masked_positions`` [M] index the
        T packed tokens and ``masked_labels`` [M] are their targets; take both from `masked_tokens` on the host, so
        the step never waits for the device to find them."""
        hidden = self.bert.forward_packed(input_ids, segments, token_type_ids)
        logits = self.cls.predictions(hidden.index_select(0, masked_positions))
        loss = F.cross_entropy(logits.float(), masked_labels)
        return MaskedLMOutput(loss, logits, masked_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None):  # fmt: skip
        """Padded API: logits [B, S, vocab] without labels; `MaskedLMOutput` with labels (-100 = ignore)."""
        if labels is None:
            return self.cls.predictions(self.bert(input_ids, attention_mask, token_type_ids))
        keep, segments = unpad(input_ids, attention_mask)
        types = token_type_ids[keep] if token_type_ids is not None else None
        return self.forward_packed(input_ids[keep], segments, *masked_tokens(labels[keep]), types)


def masked_tokens(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed labels [T] (-100 = not masked) -> (positions [M], targets [M]). Run it on the host copy of the labels:
    on a device it has to wait for the device to learn M."""
    positions = (labels != -100).nonzero().squeeze(1)
    return positions, labels[positions]


class NomicBertForSequenceClassification(nn.Module):
    """GLUE head: pooler (token 0, dense + tanh) -> dropout -> linear. Loss by ``config.problem_type``: MSE
    (regression; the default for 1 label), cross-entropy (single label; the default otherwise), or per-label
    binary cross-entropy on {0, 1} label vectors (multi_label_classification)."""

    def __init__(self, config: NomicBertConfig, attn_backend: Backend = "auto"):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.bert = NomicBertModel(config, add_pooling_layer=True, attn_backend=attn_backend)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_weights(self.classifier, config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(self.bert.pooler(hidden[:, 0])))
        loss = None
        if labels is not None:
            problem = self.config.problem_type or ("regression" if self.num_labels == 1 else "single_label")
            if problem == "regression":
                loss = F.mse_loss((logits.squeeze(-1) if self.num_labels == 1 else logits).float(), labels.float())
            elif problem == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return loss, logits


def count_parameters(module: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def mlm_flops_per_token(config: NomicBertConfig, seq_len: int, mask_fraction: float = 0.3) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 * matmul params + attention, plus the
    masked-LM head on the masked fraction only. Used for MFU in the benchmarks."""
    h, L, i = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_layer = 3 * h * h + h * h + 3 * h * i  # Wqkv, out_proj, fc11 + fc12 + fc2
    attention = 2 * 2 * seq_len * h  # QK^T and PV per token per layer (multiply-adds x2)
    head = (h * h + h * config.vocab_size) * mask_fraction
    return 3 * (2 * (L * per_layer + head) + L * attention)


__all__ = [
    "NomicBertModel",
    "NomicBertForPreTraining",
    "NomicBertForSequenceClassification",
    "MaskedLMOutput",
    "Segments",
    "count_parameters",
    "masked_tokens",
    "mlm_flops_per_token",
    "ntk_base",
    "unpad",
]
