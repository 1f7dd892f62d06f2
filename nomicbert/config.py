"""Typed model config with the published presets, and conversion to and from the two config.json layouts.

The published checkpoints carry the Nomic remote-code config (a GPT2Config subclass: ``n_embd``, ``n_layer``...);
`transformers` >= 5.23 has a native ``nomic_bert`` model whose config uses BERT names (``hidden_size``...).
We read both and write the Nomic layout, so our folders load wherever the published ones do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

EmbeddingRecipe = Literal["v1", "v1.5"]
NtkLength = Literal["sequence", "batch"]


@dataclass
class NomicBertConfig:
    """nomic-bert-2048 defaults (reference spec §1.1); every module takes the whole config."""

    vocab_size: int = 30528  # bert-base-uncased's 30522 padded to a multiple of 64
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # SwiGLU width (fc11/fc12 -> fc2)
    type_vocab_size: int = 2
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    max_trained_positions: int = 2048  # dynamic NTK starts beyond this length
    max_position_embeddings: int = 8192  # longest input the tokenizer is allowed to produce
    rotary_emb_base: float = 1000.0
    rotary_emb_fraction: float = 1.0
    rotary_scaling_factor: float | None = None  # dynamic NTK alpha; 2 serves 8192 tokens
    ntk_length: NtkLength = "sequence"  # "batch": the reference's padded-length rule, for parity only
    embedding_recipe: EmbeddingRecipe = "v1"  # v1: mean -> L2; v1.5: mean -> LayerNorm -> slice -> L2
    num_labels: int = 2  # sequence-classification head (GLUE)
    problem_type: str | None = None
    classifier_dropout: float = 0.1
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown config.json keys, written back as-is

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.rotary_emb_fraction != 1.0:
            raise ValueError(f"rotary_emb_fraction={self.rotary_emb_fraction}: only full-head rotary (1.0) is supported")
        if self.rotary_scaling_factor is not None and self.rotary_scaling_factor < 1:
            raise ValueError(f"rotary_scaling_factor must be >= 1 (got {self.rotary_scaling_factor})")
        if self.ntk_length not in ("sequence", "batch"):
            raise ValueError(f"ntk_length must be 'sequence' or 'batch' (got {self.ntk_length!r})")
        if self.embedding_recipe not in ("v1", "v1.5"):
            raise ValueError(f"embedding_recipe must be 'v1' or 'v1.5' (got {self.embedding_recipe!r})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> NomicBertConfig:
        return dataclasses.replace(self, **changes)

    # ---- config.json, Nomic remote-code layout (what the published checkpoints ship) ----
    def to_nomic_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "architectures": ["NomicBertModel"],
            "model_type": "nomic_bert",
            "auto_map": {
                "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
                "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
                "AutoModelForMaskedLM": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertForPreTraining",
            },
            "vocab_size": self.vocab_size,
            "n_embd": self.hidden_size,
            "n_layer": self.num_hidden_layers,
            "n_head": self.num_attention_heads,
            "n_inner": self.intermediate_size,
            "n_positions": self.max_position_embeddings,
            "max_trained_positions": self.max_trained_positions,
            "type_vocab_size": self.type_vocab_size,
            "pad_token_id": self.pad_token_id,
            "layer_norm_epsilon": self.layer_norm_eps,
            "initializer_range": self.initializer_range,
            "activation_function": "swiglu",
            "rotary_emb_base": self.rotary_emb_base,
            "rotary_emb_fraction": self.rotary_emb_fraction,
            "rotary_emb_interleaved": False,
            "rotary_emb_scale_base": None,
            "rotary_scaling_factor": self.rotary_scaling_factor,
            "qkv_proj_bias": False,
            "mlp_fc1_bias": False,
            "mlp_fc2_bias": False,
            "prenorm": False,
            "causal": False,
            "use_rms_norm": False,
            "parallel_block": False,
            "tie_word_embeddings": True,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "num_labels": self.num_labels,
            "problem_type": self.problem_type,
            "classifier_dropout": self.classifier_dropout,
            "nomicbert_embedding_recipe": self.embedding_recipe,
            "nomicbert_ntk_length": self.ntk_length,
        }

    # ---- config.json, transformers native ``nomic_bert`` layout ----
    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["NomicBertModel"],
            "model_type": "nomic_bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_trained_positions,
            "type_vocab_size": self.type_vocab_size,
            "pad_token_id": self.pad_token_id,
            "layer_norm_eps": self.layer_norm_eps,
            "initializer_range": self.initializer_range,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "classifier_dropout": self.classifier_dropout,
            "rope_theta": self.rotary_emb_base,
            "num_labels": self.num_labels,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NomicBertConfig:
        """Read a config.json of either layout; reject settings this architecture cannot represent."""
        if raw.get("model_type") not in (None, "nomic_bert"):
            raise ValueError(f"config.json has model_type={raw.get('model_type')!r}; expected 'nomic_bert'")
        if "n_embd" in raw or "n_layer" in raw:
            return cls._from_nomic(raw)
        return cls._from_hf(raw)

    @classmethod
    def _from_nomic(cls, raw: dict[str, Any]) -> NomicBertConfig:
        unsupported = {
            "rotary_emb_interleaved": False,
            "prenorm": False,
            "causal": False,
            "use_rms_norm": False,
            "parallel_block": False,
            "qkv_proj_bias": False,
            "mlp_fc1_bias": False,
            "mlp_fc2_bias": False,
        }
        for key, expected in unsupported.items():
            if key in raw and raw[key] not in (expected, None):
                raise ValueError(f"config.json sets {key}={raw[key]!r}; this implementation requires {expected!r}")
        if raw.get("activation_function", "swiglu") != "swiglu":
            raise ValueError(f"config.json sets activation_function={raw['activation_function']!r}; expected 'swiglu'")
        known = {
            "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "max_trained_positions",
            "type_vocab_size", "pad_token_id", "layer_norm_epsilon", "initializer_range", "rotary_emb_base",
            "rotary_emb_fraction", "rotary_scaling_factor", "num_labels", "problem_type", "classifier_dropout",
            "nomicbert_embedding_recipe", "nomicbert_ntk_length", "architectures", "model_type", "auto_map",
            "activation_function", "tie_word_embeddings", "resid_pdrop", "embd_pdrop", "attn_pdrop",
            *unsupported,
        }  # fmt: skip
        hidden = raw.get("n_embd", 768)
        n_inner = raw.get("n_inner") or 4 * hidden
        return cls(
            vocab_size=raw.get("vocab_size", 30528),
            hidden_size=hidden,
            num_hidden_layers=raw.get("n_layer", 12),
            num_attention_heads=raw.get("n_head", 12),
            intermediate_size=int(n_inner),
            type_vocab_size=raw.get("type_vocab_size", 2),
            pad_token_id=raw.get("pad_token_id") or 0,
            layer_norm_eps=raw.get("layer_norm_epsilon", 1e-12),
            initializer_range=raw.get("initializer_range", 0.02),
            max_trained_positions=raw.get("max_trained_positions", 2048),
            max_position_embeddings=raw.get("n_positions", 8192),
            rotary_emb_base=float(raw.get("rotary_emb_base", 1000.0)),
            rotary_emb_fraction=float(raw.get("rotary_emb_fraction", 1.0)),
            rotary_scaling_factor=raw.get("rotary_scaling_factor"),
            ntk_length=raw.get("nomicbert_ntk_length", "sequence"),
            embedding_recipe=raw.get("nomicbert_embedding_recipe", "v1"),
            num_labels=raw.get("num_labels", 2),
            problem_type=raw.get("problem_type"),
            classifier_dropout=raw.get("classifier_dropout") or 0.1,
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @classmethod
    def _from_hf(cls, raw: dict[str, Any]) -> NomicBertConfig:
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swiglu"):
            raise ValueError(f"config.json sets hidden_act={act!r}; NomicBert's MLP is SwiGLU (silu)")
        rope = raw.get("rope_parameters") or {}
        return cls(
            vocab_size=raw.get("vocab_size", 30528),
            hidden_size=raw.get("hidden_size", 768),
            num_hidden_layers=raw.get("num_hidden_layers", 12),
            num_attention_heads=raw.get("num_attention_heads", 12),
            intermediate_size=raw.get("intermediate_size", 3072),
            type_vocab_size=raw.get("type_vocab_size", 2),
            pad_token_id=raw.get("pad_token_id") or 0,
            layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
            initializer_range=raw.get("initializer_range", 0.02),
            max_trained_positions=raw.get("max_position_embeddings", 2048),
            rotary_emb_base=float(rope.get("rope_theta", raw.get("rope_theta", 1000.0))),
            num_labels=raw.get("num_labels", 2),
            classifier_dropout=raw.get("classifier_dropout") or 0.1,
        )


def nomic_bert_2048() -> NomicBertConfig:
    """The masked-LM model (nomic-ai/nomic-bert-2048)."""
    return NomicBertConfig()


def nomic_embed_text_v1() -> NomicBertConfig:
    """The contrastive embedder: mean pooling -> L2."""
    return NomicBertConfig(embedding_recipe="v1")


def nomic_embed_text_v1_5() -> NomicBertConfig:
    """The Matryoshka embedder: mean pooling -> weightless LayerNorm -> first d dims -> L2."""
    return NomicBertConfig(embedding_recipe="v1.5")


def tiny(**changes: Any) -> NomicBertConfig:
    """A 2-layer model for CPU tests: small trained length so NTK is reachable cheaply."""
    base = NomicBertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_trained_positions=64,
        max_position_embeddings=512,
    )
    return base.replace(**changes)


PRESETS = {
    "nomic-bert-2048": nomic_bert_2048,
    "nomic-embed-text-v1": nomic_embed_text_v1,
    "nomic-embed-text-v1.5": nomic_embed_text_v1_5,
    "tiny": tiny,
}


def preset(name: str) -> NomicBertConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
