"""Checkpoint I/O: the published Nomic key layout on disk, pure key-map conversions, strict loading.

Three layouts exist: ours = the Nomic remote-code layout (spec §3; ``bert.`` + ``cls.*`` for the
masked-LM model), the `transformers` native ``nomic_bert`` layout (``q_proj``/``gate_proj``...,
``nomic_bert.`` prefix on head models), and sentence-transformers folders (either one at the root).
Conversions are state-dict-in, state-dict-out functions over ``{}``-templated key maps; an unknown key
is an error, never skipped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nomicbert.config import CONFIG_NAME, NomicBertConfig, hub_error, load_config, local_folder, read_config
from nomicbert.model import NomicBertForPreTraining, NomicBertForSequenceClassification, NomicBertModel

WEIGHTS_NAME = "model.safetensors"
ModelKind = Literal["encoder", "mlm", "classifier"]
POOLING_FLAGS = {"mean": "mean_tokens", "cls": "cls_token", "max": "max_tokens", "lasttoken": "lasttoken"}
StateDict = dict[str, torch.Tensor]

# Nomic key -> transformers-native key, per layer ({} = layer index). Wqkv splits into three.
_ENCODER_TO_HF = {
    "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "emb_ln.weight": "embeddings.LayerNorm.weight",
    "emb_ln.bias": "embeddings.LayerNorm.bias",
    "encoder.layers.{}.attn.out_proj.weight": "layers.{}.self_attn.o_proj.weight",
    "encoder.layers.{}.mlp.fc11.weight": "layers.{}.mlp.up_proj.weight",
    "encoder.layers.{}.mlp.fc12.weight": "layers.{}.mlp.gate_proj.weight",
    "encoder.layers.{}.mlp.fc2.weight": "layers.{}.mlp.down_proj.weight",
    "encoder.layers.{}.norm1.weight": "layers.{}.post_attention_layernorm.weight",
    "encoder.layers.{}.norm1.bias": "layers.{}.post_attention_layernorm.bias",
    "encoder.layers.{}.norm2.weight": "layers.{}.post_mlp_layernorm.weight",
    "encoder.layers.{}.norm2.bias": "layers.{}.post_mlp_layernorm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}
_HEAD_TO_HF = {
    "cls.predictions.transform.dense.weight": "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.layer_norm.weight": "cls.predictions.transform.layer_norm.weight",
    "cls.predictions.transform.layer_norm.bias": "cls.predictions.transform.layer_norm.bias",
    "cls.predictions.decoder.weight": "cls.predictions.decoder.weight",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
_QKV = "encoder.layers.{}.attn.Wqkv.weight"
_HF_QKV = ("layers.{}.self_attn.q_proj.weight", "layers.{}.self_attn.k_proj.weight", "layers.{}.self_attn.v_proj.weight")
# biases the native masked-LM head has and ours does not: exported as zeros, accepted only when zero
_HF_ZERO_BIASES = ("cls.predictions.bias", "cls.predictions.decoder.bias", "cls.predictions.transform.dense.bias")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the keys."""


def _template(key: str) -> tuple[str, str | None]:
    """``encoder.layers.3.mlp.fc2.weight`` -> (``encoder.layers.{}.mlp.fc2.weight``, ``"3"``)."""
    match = re.search(r"\.(\d+)\.", key)
    if not match:
        return key, None
    return key[: match.start()] + ".{}." + key[match.end() :], match.group(1)


def nomic_to_hf(state: StateDict) -> StateDict:
    """Nomic layout -> transformers-native layout (``bert.`` prefix becomes ``nomic_bert.``)."""
    out: StateDict = {}
    for key, value in state.items():
        prefix = ""
        if key.startswith("bert."):
            prefix, key = "nomic_bert.", key[len("bert.") :]
        template, layer = _template(key)
        if template == _QKV:
            for name, part in zip(_HF_QKV, value.chunk(3, dim=0)):
                out[prefix + name.format(layer)] = part.clone()
        elif template in _ENCODER_TO_HF:
            out[prefix + _ENCODER_TO_HF[template].format(layer)] = value
        elif key in _HEAD_TO_HF:
            out[_HEAD_TO_HF[key]] = value
        else:
            raise CheckpointError(f"unknown key {prefix or ''}{key} in a Nomic-layout state dict")
    if "cls.predictions.transform.dense.weight" in out:
        hidden = out["cls.predictions.transform.dense.weight"].shape[0]
        vocab = out.get("cls.predictions.decoder.weight", out["nomic_bert.embeddings.word_embeddings.weight"]).shape[0]
        out["cls.predictions.transform.dense.bias"] = torch.zeros(hidden)
        out["cls.predictions.bias"] = torch.zeros(vocab)
    return out


_HF_TO_ENCODER = {v: k for k, v in _ENCODER_TO_HF.items()}
_HF_TO_HEAD = {v: k for k, v in _HEAD_TO_HF.items()}


def hf_to_nomic(state: StateDict) -> StateDict:
    """transformers-native layout -> Nomic layout. Non-zero biases that NomicBert has no place for are errors."""
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _HF_ZERO_BIASES or key.endswith("inv_freq"):
            if key in _HF_ZERO_BIASES and torch.count_nonzero(value):
                raise CheckpointError(f"{key} is non-zero; NomicBert's masked-LM head has no bias")
            continue
        prefix = ""
        if key.startswith("nomic_bert."):
            prefix, key = "bert.", key[len("nomic_bert.") :]
        template, layer = _template(key)
        if template in _HF_QKV:
            qkv.setdefault((prefix, layer), {})[_HF_QKV.index(template)] = value
        elif template in _HF_TO_ENCODER:
            out[prefix + _HF_TO_ENCODER[template].format(layer)] = value
        elif key in _HF_TO_HEAD:
            out[_HF_TO_HEAD[key]] = value
        else:
            raise CheckpointError(f"unknown key {prefix and 'nomic_bert.'}{key} in a transformers-layout state dict")
    for (prefix, layer), parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            missing = [_HF_QKV[i].format(layer) for i in range(3) if i not in parts]
            raise CheckpointError(f"missing keys {missing}: q, k and v projections must all be present")
        out[prefix + _QKV.format(layer)] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


def to_nomic_layout(state: StateDict) -> StateDict:
    """Any supported layout -> Nomic layout (detected by the attention key names)."""
    if any(".self_attn.q_proj." in k for k in state):
        return hf_to_nomic(state)
    return dict(state)


def encoder_from_pretraining(state: StateDict) -> StateDict:
    """Masked-LM state dict (``bert.*`` + ``cls.*``) -> encoder state dict: the contrastive stage's init."""
    return {k[len("bert.") :]: v for k, v in state.items() if k.startswith("bert.")}


DECODER = "cls.predictions.decoder.weight"
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"


def load_state_dict_strict(model: nn.Module, state: StateDict, allow_missing: tuple[str, ...] = ()) -> None:
    """Load or raise `CheckpointError` naming every missing, unexpected or mis-shaped key.
    ``allow_missing``: key prefixes the caller initialises afresh (e.g. a new classification head)."""
    expected = model.state_dict()
    config = getattr(model, "config", None)
    tied = {DECODER} if config is None or config.tie_word_embeddings else set()  # stored once, as word embeddings
    missing = [k for k in expected if k not in state and k not in tied and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in expected or k in tied]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in state if k in expected and state[k].shape != expected[k].shape]  # fmt: skip
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if shapes:
        problems.append(f"mis-shaped keys: {shapes}")
    if problems:
        raise CheckpointError("checkpoint does not fit the model; " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def drop_tied_decoder(state: StateDict, config: NomicBertConfig, source: str | os.PathLike) -> StateDict:
    """A tied model stores its decoder once, as the word embeddings: a decoder key equal to them (transformers'
    export writes one) is dropped; a different one would overwrite the embeddings on load, so it is an error
    unless config.json says ``tie_word_embeddings: false``."""
    if DECODER not in state or not config.tie_word_embeddings:
        return state
    embeddings = state.get(WORD_EMBEDDINGS)
    if embeddings is None or not torch.equal(state[DECODER], embeddings):
        raise CheckpointError(f"{source}: {DECODER} differs from {WORD_EMBEDDINGS}, but config.json says "
                              "tie_word_embeddings: true; loading it would overwrite the word embeddings. Set "
                              "tie_word_embeddings: false in config.json to load an untied decoder")  # fmt: skip
    return {k: v for k, v in state.items() if k != DECODER}


def resolve(source: str | os.PathLike) -> Path:
    """A local folder, or a Hub id downloaded to the local cache (needs the network or a warm cache)."""
    folder = local_folder(source)
    if folder is not None:
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except (OSError, ValueError) as err:
        raise hub_error(source, err) from None


def read_state_dict(folder: Path) -> StateDict:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if (folder / "pytorch_model.bin").is_file():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    state: StateDict = {}
    for file in files:
        state.update(load_file(file))
    return state


def build(config: NomicBertConfig, kind: ModelKind) -> nn.Module:
    if kind == "encoder":
        return NomicBertModel(config)
    if kind == "mlm":
        return NomicBertForPreTraining(config)
    if kind == "classifier":
        return NomicBertForSequenceClassification(config)
    raise ValueError(f"unknown model kind {kind!r}; choose encoder, mlm or classifier")


def load_model(source: str | os.PathLike, kind: ModelKind = "encoder", **config_overrides) -> nn.Module:
    """Load any supported folder or Hub id strictly into the model ``kind``.

    An encoder loads from an encoder or a masked-LM checkpoint (the head is dropped); a masked-LM model
    needs a masked-LM checkpoint; a classifier starts from either and initialises its pooler and head
    unless the checkpoint has them.
    """
    folder = resolve(source)
    config = read_config(folder).replace(**config_overrides)
    state = to_nomic_layout(read_state_dict(folder))
    state = drop_tied_decoder(state, config, source)
    is_pretraining = any(k.startswith("bert.") for k in state)
    model = build(config, kind)
    if kind == "encoder":
        if is_pretraining:
            state = encoder_from_pretraining(state)
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        load_state_dict_strict(model, state)
    elif kind == "mlm":
        if not is_pretraining:
            raise CheckpointError(f"{source} holds an encoder without a masked-LM head (no bert.*/cls.* keys)")
        load_state_dict_strict(model, state)
    else:
        if not is_pretraining:
            state = {"bert." + k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("cls.")}
        load_state_dict_strict(model, state, allow_missing=("bert.pooler.", "classifier."))
    return model


def _state_to_save(model: nn.Module, weights: StateDict | None = None) -> StateDict:
    state = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if weights is None else weights).items()}
    if getattr(model, "config", None) is None or model.config.tie_word_embeddings:
        state.pop(DECODER, None)  # tied: stored once, as the word embeddings
    return state


def copy_tokenizer(tokenizer, folder: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def save_pretrained(model: nn.Module, folder: str | os.PathLike, tokenizer=None, weights: StateDict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the published Nomic layout (+ tokenizer files).
    ``weights``: the model's full state dict when ``model`` itself is sharded (FSDP)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: NomicBertConfig = model.config
    raw = config.to_nomic_dict()
    if isinstance(model, NomicBertForPreTraining):
        raw["architectures"] = ["NomicBertForPreTraining"]
    elif isinstance(model, NomicBertForSequenceClassification):
        raw["architectures"] = ["NomicBertForSequenceClassification"]
    save_file(_state_to_save(model, weights), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(raw, indent=2))
    copy_tokenizer(tokenizer, folder)
    return folder


def export_hf(model: nn.Module, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Write a folder that ``transformers.AutoModel.from_pretrained`` loads as its native ``NomicBert``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: NomicBertConfig = model.config
    raw = config.to_hf_dict()
    if isinstance(model, NomicBertForPreTraining):
        raw["architectures"] = ["NomicBertForMaskedLM"]
    elif isinstance(model, NomicBertForSequenceClassification):
        raw["architectures"] = ["NomicBertForSequenceClassification"]
    state = nomic_to_hf(_state_to_save(model))
    if isinstance(model, NomicBertForPreTraining) and config.tie_word_embeddings:
        state[DECODER] = state["nomic_bert.embeddings.word_embeddings.weight"].clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(raw, indent=2))
    copy_tokenizer(tokenizer, folder)
    return folder


def export_sentence_transformers(model: NomicBertModel, folder: str | os.PathLike, tokenizer=None,
                                 max_seq_length: int = 512) -> Path:  # fmt: skip
    """A sentence-transformers folder: native transformers model at the root, mean pooling, the v1.5
    weightless LayerNorm when the recipe asks for it, L2 normalisation, and the four task prompts."""
    from nomicbert.embed import TASK_PREFIXES

    if not isinstance(model, NomicBertModel):
        raise TypeError("export_sentence_transformers takes an encoder (NomicBertModel)")
    folder = export_hf(model, folder, tokenizer)
    layer_norm = model.config.embedding_recipe == "v1.5"
    write_sentence_transformers_config(folder, model.config.hidden_size, layer_norm=layer_norm,
                                       max_seq_length=max_seq_length, prompts=TASK_PREFIXES)
    return folder


def write_sentence_transformers_config(folder: Path, hidden: int, pooling: str = "mean", layer_norm: bool = False,
                                       normalize: bool = True, max_seq_length: int = 512,
                                       prompts: dict[str, str] | None = None) -> None:  # fmt: skip
    """The sentence-transformers files beside a transformers model at ``folder``'s root: Transformer ->
    Pooling -> [weightless LayerNorm (v1.5)] -> [Normalize], max length, task prompts."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, f"pooling_mode_{POOLING_FLAGS[pooling]}": True}, indent=2)
    )
    if layer_norm:
        from sentence_transformers.models import LayerNorm

        (folder / "2_LayerNorm").mkdir(exist_ok=True)
        LayerNorm(hidden).save(str(folder / "2_LayerNorm"))  # eps 1e-5, weight 1, bias 0: v1.5's weightless LN
        modules.append({"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    if normalize:  # its own (empty) folder: at the root it would read the model's config.json as its own
        path = f"{len(modules)}_Normalize"
        (folder / path).mkdir(exist_ok=True)
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": path,
                        "type": "sentence_transformers.models.Normalize"})  # fmt: skip
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2)
    )
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": dict(prompts or {}), "default_prompt_name": None, "similarity_fn_name": "cosine"},
                   indent=2)  # fmt: skip
    )


def export_all(model: nn.Module, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Our layout at the root plus ``hf/`` and (encoders) ``st/`` exports: the checkpoint folder layout."""
    folder = save_pretrained(model, folder, tokenizer)
    export_hf(model, folder / "hf", tokenizer)
    if isinstance(model, NomicBertModel):
        export_sentence_transformers(model, folder / "st", tokenizer)
    return folder


__all__ = [
    "CheckpointError",
    "export_all",
    "export_hf",
    "export_sentence_transformers",
    "hf_to_nomic",
    "load_config",
    "load_model",
    "load_state_dict_strict",
    "nomic_to_hf",
    "save_pretrained",
]
