"""Typed model config with the published presets, and conversion to and from the two config.json layouts.

The published checkpoints carry the Nomic remote-code config (a GPT2Config subclass: ``n_embd``, ``n_layer``...);
`transformers` >= 5.23 has a native ``nomic_bert`` model whose config uses BERT names (``hidden_size``...).
We read both and write the Nomic layout, so our folders load wherever the published ones do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_NAME = "config.json"
EmbeddingRecipe = Literal["v1", "v1.5"]
NtkLength = Literal["sequence", "batch"]
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
TASK_PREFIXES = {
    "search_query": "search_query: ",
    "search_document": "search_document: ",
    "classification": "classification: ",
    "clustering": "clustering: ",
}
MATRYOSHKA_DIMS = (768, 512, 256, 128, 64)  # the dims v1.5 is trained at (spec §7.2)
MIN_DIM = 64


def check_dim(dim: int | None, hidden_size: int) -> None:
    """An embedding dim must lie within MIN_DIM (or the width, when smaller) and the model's width."""
    if dim is not None and not (min(MIN_DIM, hidden_size) <= dim <= hidden_size):
        raise ValueError(f"embedding dim {dim} is outside {min(MIN_DIM, hidden_size)}..{hidden_size}")


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
    problem_type: str | None = None  # None: MSE for 1 label, else cross-entropy; or one of PROBLEM_TYPES
    classifier_dropout: float = 0.1
    tie_word_embeddings: bool = True  # the masked-LM decoder shares the word embeddings (published: tied)
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
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {list(PROBLEM_TYPES)} or null (got {self.problem_type!r})")
        if not 0 <= self.classifier_dropout < 1:
            raise ValueError(f"classifier_dropout must be within [0, 1) (got {self.classifier_dropout})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def trained_dims(self) -> tuple[int, ...]:
        """Embedding dims the model was trained to serve: the Matryoshka dims for v1.5, else the full width."""
        if self.embedding_recipe == "v1.5":
            return tuple(sorted({self.hidden_size, *(d for d in MATRYOSHKA_DIMS if d <= self.hidden_size)}, reverse=True))
        return (self.hidden_size,)

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
            "tie_word_embeddings": self.tie_word_embeddings,
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
        """The native layout; fields it has no name for keep ours (``nomicbert_*``), so a reload is exact."""
        if self.rotary_scaling_factor:
            rope = {"rope_type": "dynamic", "factor": float(self.rotary_scaling_factor), "rope_theta": self.rotary_emb_base}
        else:
            rope = {"rope_type": "default", "rope_theta": self.rotary_emb_base}
        return {
            **self.extra,
            "architectures": ["NomicBertModel"],
            "model_type": "nomic_bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_trained_positions,  # where transformers' dynamic NTK starts
            "type_vocab_size": self.type_vocab_size,
            "pad_token_id": self.pad_token_id,
            "layer_norm_eps": self.layer_norm_eps,
            "initializer_range": self.initializer_range,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_labels": self.num_labels,
            "problem_type": self.problem_type,
            "classifier_dropout": self.classifier_dropout,
            "nomicbert_max_position_embeddings": self.max_position_embeddings,
            "nomicbert_embedding_recipe": self.embedding_recipe,
            "nomicbert_ntk_length": self.ntk_length,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NomicBertConfig:
        """Read a config.json of either layout; reject settings this architecture cannot represent."""
        if raw.get("model_type") not in (None, "nomic_bert"):
            raise ValueError(f"config.json has model_type={raw.get('model_type')!r}; expected 'nomic_bert'")
        if "n_embd" in raw or "n_layer" in raw:
            return cls._from_nomic(raw)
        return cls._from_hf(raw)

    @staticmethod
    def _common(raw: dict[str, Any]) -> dict[str, Any]:
        """Fields named alike in both layouts. A missing value takes the default; a present one is kept, 0.0
        included. ``id2label`` (what transformers writes) gives the label count when ``num_labels`` is absent."""
        labels = raw.get("num_labels", len(raw["id2label"]) if isinstance(raw.get("id2label"), dict) else 2)
        dropout = raw.get("classifier_dropout")
        tied = raw.get("tie_word_embeddings")
        return {
            "num_labels": int(labels),
            "problem_type": raw.get("problem_type"),
            "classifier_dropout": 0.1 if dropout is None else float(dropout),
            "tie_word_embeddings": True if tied is None else bool(tied),
            "pad_token_id": raw.get("pad_token_id") or 0,
            "vocab_size": raw.get("vocab_size", 30528),
            "type_vocab_size": raw.get("type_vocab_size", 2),
            "initializer_range": raw.get("initializer_range", 0.02),
            "ntk_length": raw.get("nomicbert_ntk_length", "sequence"),
            "embedding_recipe": raw.get("nomicbert_embedding_recipe", "v1"),
        }

    _COMMON_KEYS = ("num_labels", "id2label", "label2id", "problem_type", "classifier_dropout", "tie_word_embeddings",
                    "pad_token_id", "vocab_size", "type_vocab_size", "initializer_range", "nomicbert_ntk_length",
                    "nomicbert_embedding_recipe", "architectures", "model_type")  # fmt: skip

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
            "rotary_emb_scale_base": None,
        }
        for key, expected in unsupported.items():
            if key in raw and raw[key] not in (expected, None):
                raise ValueError(f"config.json sets {key}={raw[key]!r}; this implementation requires {expected!r}")
        if raw.get("activation_function", "swiglu") != "swiglu":
            raise ValueError(f"config.json sets activation_function={raw['activation_function']!r}; expected 'swiglu'")
        known = {
            "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "max_trained_positions", "layer_norm_epsilon",
            "rotary_emb_base", "rotary_emb_fraction", "rotary_scaling_factor", "auto_map", "activation_function",
            "resid_pdrop", "embd_pdrop", "attn_pdrop", *cls._COMMON_KEYS, *unsupported,
        }  # fmt: skip
        hidden = raw.get("n_embd", 768)
        n_inner = raw.get("n_inner") or 4 * hidden
        return cls(
            hidden_size=hidden,
            num_hidden_layers=raw.get("n_layer", 12),
            num_attention_heads=raw.get("n_head", 12),
            intermediate_size=int(n_inner),
            layer_norm_eps=raw.get("layer_norm_epsilon", 1e-12),
            max_trained_positions=raw.get("max_trained_positions", 2048),
            max_position_embeddings=raw.get("n_positions", 8192),
            rotary_emb_base=float(raw.get("rotary_emb_base", 1000.0)),
            rotary_emb_fraction=float(raw.get("rotary_emb_fraction", 1.0)),
            rotary_scaling_factor=raw.get("rotary_scaling_factor"),
            **cls._common(raw),
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @classmethod
    def _from_hf(cls, raw: dict[str, Any]) -> NomicBertConfig:
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swiglu"):
            raise ValueError(f"config.json sets hidden_act={act!r}; NomicBert's MLP is SwiGLU (silu)")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "dynamic"):
            raise ValueError(f"config.json sets rope_type={rope_type!r}; NomicBert supports 'default' and 'dynamic' (NTK)")
        factor = rope.get("factor") if rope_type == "dynamic" else None
        known = {
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "max_position_embeddings", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
            "rope_parameters", "rope_scaling", "rope_theta", "nomicbert_max_position_embeddings", "head_dim",
            "transformers_version", "dtype", "torch_dtype", *cls._COMMON_KEYS,
        }  # fmt: skip
        trained = raw.get("max_position_embeddings", 2048)
        return cls(
            hidden_size=raw.get("hidden_size", 768),
            num_hidden_layers=raw.get("num_hidden_layers", 12),
            num_attention_heads=raw.get("num_attention_heads", 12),
            intermediate_size=raw.get("intermediate_size", 3072),
            layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
            max_trained_positions=trained,
            max_position_embeddings=raw.get("nomicbert_max_position_embeddings", max(8192, trained)),
            rotary_emb_base=float(rope.get("rope_theta", raw.get("rope_theta", 1000.0))),
            rotary_scaling_factor=None if factor is None else float(factor),
            **cls._common(raw),
            extra={k: v for k, v in raw.items() if k not in known},
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


# ---- where a model lives: a local folder or a Hub id; its config without any weights (no torch import) ----
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".npy", ".txt")


def local_folder(source: str | os.PathLike) -> Path | None:
    """The folder ``source`` names, or None when it reads as a Hub id (``owner/name`` whose owner is no local
    folder). A local-looking path that does not exist is an error, never a Hub request."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{source} is a file; expected a model folder with {CONFIG_NAME} and weights")
    text = str(source)
    owner = text.split("/", 1)[0]
    if not _HUB_ID.fullmatch(text) or text.endswith(_FILE_SUFFIXES) or Path(owner).is_dir():
        why = f" ({owner}/ exists here, so it is a local path)" if "/" in text and Path(owner).is_dir() else ""
        raise FileNotFoundError(f"model folder {source} does not exist{why}; a Hub id reads owner/name")
    return None


def hub_error(source: str | os.PathLike, err: Exception) -> FileNotFoundError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return FileNotFoundError(f"cannot fetch {source} from the Hugging Face Hub ({first})")


def read_config(folder: Path) -> NomicBertConfig:
    """``folder/config.json`` of either layout; a file that is not a valid config is a ValueError naming it."""
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not a valid JSON config ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object")
    try:
        return NomicBertConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None


def load_config(source: str | os.PathLike) -> NomicBertConfig:
    """The config of a folder or Hub id without reading any weights: for checks that must come before loading."""
    folder = local_folder(source)
    if folder is not None:
        return read_config(folder)
    from huggingface_hub import hf_hub_download

    try:
        file = Path(hf_hub_download(str(source), CONFIG_NAME))
    except (OSError, ValueError) as err:
        raise hub_error(source, err) from None
    return read_config(file.parent)
