"""One trainable encoder interface (tokenize -> embed) over NomicBERT and any BERT-family `transformers` model.

The embedding stages, the mining teacher and tests take an `Encoder`, whatever the checkpoint is:

- `NomicEncoder`: our NomicBERT (our checkpoint, a published Nomic one, a `transformers` NomicBert folder); packed
  variable-length tokens, no compute on padding.
- `TransformersEncoder`: a `transformers` ``AutoModel`` folder or Hub id (mean pooling, L2), or a
  sentence-transformers folder, whose pooling (mean / cls / max / last token), LayerNorm and Normalize modules are
  taken over. Texts are sorted by length and cut into batches of similar length under a token budget, so little
  compute goes to padding; the output order is the input order.

``forward(token_lists)`` returns the pooled, not yet normalised, fp32 embeddings [n, H] with a graph, which is
what `nomicbert.losses` takes; ``finalize`` applies the model's own recipe (L2; the v1.5 LayerNorm; a Matryoshka
dim; binary). ``export(folder)`` writes a loadable model folder that is always also usable as a
sentence-transformers model with the four task prompts (NomicBERT: our layout + ``hf/`` + ``st/``; transformers:
a sentence-transformers folder at the root).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from nomicbert.attention import pack_sequences
from nomicbert.checkpoint import CONFIG_NAME, resolve, write_sentence_transformers_config
from nomicbert.embed import TASK_PREFIXES, finalize, mean_pool_packed

Pooling = Literal["mean", "cls", "max", "lasttoken"]
POOLING_MODES = ("mean", "cls", "max", "lasttoken")
ST_MODULES = "modules.json"


class EncoderError(ValueError):
    """A model folder the encoder interface cannot take (unsupported module, pooling or layout); names it."""


class Encoder(nn.Module):
    """Token-id lists -> pooled fp32 embeddings [n, H]. Subclasses set ``model`` (the parameters to train),
    ``tokenizer``, ``max_length`` (the model's own position limit), ``recipe`` ("v1" | "v1.5"), ``prompts``
    (task name -> prefix the model was trained with) and implement ``forward``, ``save`` and ``export``."""

    model: nn.Module
    tokenizer: object
    max_length: int
    recipe: str
    prompts: dict[str, str]

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids with special tokens, truncated at ``max_length`` (never beyond the model's own limit)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        limit = min(max_length or self.max_length, self.max_length)
        if not texts:
            return []
        return self.tokenizer(list(texts), truncation=True, max_length=limit, return_attention_mask=False)["input_ids"]

    def add_prompt(self, texts: Sequence[str], task: str | None) -> list[str]:
        if task is None:
            return list(texts)
        if task not in TASK_PREFIXES:
            raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASK_PREFIXES)} or None")
        return [self.prompts.get(task, "") + t for t in texts]

    def finalize(self, pooled: torch.Tensor, dim: int | None = None, binary: bool = False,
                 normalize: bool = True) -> torch.Tensor:  # fmt: skip
        """The model's recipe on pooled embeddings: v1.5 LayerNorm (if the model has it), binary, first ``dim``
        features, L2."""
        x = pooled.float()
        if self.recipe == "v1.5":
            x = F.layer_norm(x, (x.shape[-1],), eps=1e-5)
        if binary:
            x = (x > 0).float()
        x = x[:, :dim] if dim is not None else x
        return F.normalize(x, dim=-1) if normalize else x

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], task: str | None = None, dim: int | None = None, binary: bool = False,
               max_length: int | None = None, normalize: bool = True) -> torch.Tensor:  # fmt: skip
        """Inference: float32 [n, dim or H] on the CPU, in input order (the model's mode is restored after)."""
        if dim is not None and not 0 < dim <= self.hidden_size:
            raise ValueError(f"dim {dim} is outside 1..{self.hidden_size}")
        was_training = self.training
        self.eval()
        try:
            pooled = self(self.tokenize(self.add_prompt(texts, task), max_length)) if texts else \
                torch.zeros(0, self.hidden_size)  # fmt: skip
        finally:
            self.train(was_training)
        return self.finalize(pooled.cpu(), dim, binary, normalize)

    def set_dropout(self, rate: float) -> None:
        """Every dropout of the model at ``rate`` while training (the Nomic recipe trains without dropout; a BERT
        checkpoint's own is 0.1). The saved config keeps the checkpoint's values."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout must be within [0, 1) (got {rate})")
        for module in self.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = rate

    def save(self, folder: str | os.PathLike, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """A loadable model folder (weights, config, tokenizer); ``weights``: a full state dict of ``model`` when
        the live one is sharded."""
        raise NotImplementedError

    def export(self, folder: str | os.PathLike) -> Path:
        """The final model folder: ``save`` plus the sentence-transformers files (four prompts)."""
        raise NotImplementedError


class NomicEncoder(Encoder):
    """NomicBERT on packed tokens: one forward over the concatenated sequences, mean pooling per sequence."""

    def __init__(self, model, tokenizer, max_length: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_length = max_length or model.config.max_position_embeddings
        self.recipe = model.config.embedding_recipe
        self.prompts = dict(TASK_PREFIXES)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, segments = pack_sequences(token_lists, self.device)  # offsets on the host: the step never waits
        return mean_pool_packed(self.model.forward_packed(ids, segments), segments)

    def set_dropout(self, rate: float) -> None:
        if rate != 0.0:
            raise ValueError(f"dropout {rate}: NomicBERT's encoder has no dropout (the recipe trains without); "
                             "use 0.0 or null")  # fmt: skip

    def save(self, folder: str | os.PathLike, weights: dict[str, torch.Tensor] | None = None) -> Path:
        from nomicbert.checkpoint import save_pretrained

        return save_pretrained(self.model, folder, self.tokenizer, weights=weights)

    def export(self, folder: str | os.PathLike) -> Path:
        from nomicbert.checkpoint import export_all

        return export_all(self.model, folder, self.tokenizer)


CPU_BATCH_TOKENS = 2048  # padded tokens per forward of a `transformers` encoder on the CPU (length_batches)
ACCELERATOR_BATCH_TOKENS = 16384
CPU_TRAINING_ATTENTION = "sdpa_cpu_training"


def sdpa_cpu_training(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """`transformers`' SDPA attention, in fp32 when a model trains under bf16 autocast on the CPU: there PyTorch's
    bf16 flash-attention backward is 3-5x slower than the fp32 one (MiniLM, 2 threads: a training step 1.5x faster
    at 128 tokens; benchmarks/RESULTS.md). Inference and accelerators keep the plain SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not (module.training and query.device.type == "cpu" and query.dtype == torch.bfloat16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast("cpu", enabled=False):  # the mask is SDPA's boolean one (registered below)
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)  # fmt: skip
    return out.to(query.dtype), weights


def use_cpu_training_attention(model: nn.Module) -> None:
    """Route an SDPA `transformers` model through `sdpa_cpu_training` (other attention implementations are kept)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(CPU_TRAINING_ATTENTION, sdpa_cpu_training)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_TRAINING_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CPU_TRAINING_ATTENTION)


class TransformersEncoder(Encoder):
    """A `transformers` encoder with sentence-transformers style pooling, batched by similar length.

    Args: ``model`` an ``AutoModel`` (BERT family: right padding, ``attention_mask``); ``pooling``; ``normalize``
    (whether the model's embeddings are L2-normalised, kept for the export; the losses normalise anyway);
    ``recipe`` "v1.5" when a weightless LayerNorm follows the pooling (Matryoshka); ``batch_tokens`` the padded
    token budget of one forward (None: ``CPU_BATCH_TOKENS`` on the CPU, ``ACCELERATOR_BATCH_TOKENS`` elsewhere).
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int, pooling: Pooling = "mean",
                 normalize: bool = True, recipe: str = "v1", prompts: dict[str, str] | None = None,
                 batch_tokens: int | None = None):  # fmt: skip
        super().__init__()
        if pooling not in POOLING_MODES:
            raise EncoderError(f"pooling {pooling!r} is not supported; choose one of {POOLING_MODES}")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.pooling, self.normalize, self.recipe = pooling, normalize, recipe
        self.prompts = dict(prompts or {})
        self.batch_tokens = batch_tokens
        use_cpu_training_attention(model)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def length_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices sorted by length, cut so that (count x longest) stays within the token budget. Not cut further
        to save padding: on the CPU (MiniLM, 2 threads) forwards of a few rows cost more per token than the ~7%
        padding they save (measured on the fine-tuning bench: 1.4x slower with at most 64 padding tokens per
        forward). The CPU budget is small because a forward + backward over more than ~4k padded tokens falls off
        a cliff there (MiniLM, 256 tokens: 32 rows 7.7-9.7 s, the same rows as 4 x 8 rows 4.0 s)."""
        budget = self.batch_tokens or (CPU_BATCH_TOKENS if self.device.type == "cpu" else ACCELERATOR_BATCH_TOKENS)
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        for i in order:
            if batches and (len(batches[-1]) + 1) * lengths[i] <= budget:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def forward(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        device, pad = self.device, self.tokenizer.pad_token_id or 0
        lengths = [len(t) for t in token_lists]
        parts, order = [], []
        for batch in self.length_batches(lengths):
            longest = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : lengths[i]] = torch.tensor(token_lists[i], dtype=torch.long)
                mask[row, : lengths[i]] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            parts.append(pool(hidden, mask, self.pooling))
            order.extend(batch)
        pooled = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long, device=pooled.device)
        inverse[torch.tensor(order, device=pooled.device)] = torch.arange(len(order), device=pooled.device)
        return pooled[inverse]

    def save(self, folder: str | os.PathLike, weights: dict[str, torch.Tensor] | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder), state_dict=weights)
        self.tokenizer.save_pretrained(str(folder))
        self.write_st_config(folder)
        return folder

    def export(self, folder: str | os.PathLike) -> Path:
        return self.save(folder)

    def write_st_config(self, folder: Path) -> None:
        """sentence-transformers modules at the root (the model folder is the Transformer module), with the
        prompts the model was trained with (the four Nomic task prefixes for a model our stages trained)."""
        write_sentence_transformers_config(folder, self.hidden_size, pooling=self.pooling,
                                           layer_norm=self.recipe == "v1.5", normalize=self.normalize,
                                           max_seq_length=self.max_length,
                                           prompts={**TASK_PREFIXES, **self.prompts})  # fmt: skip


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: Pooling) -> torch.Tensor:
    """[B, S, H] right-padded hidden states -> [B, H] fp32 (sentence-transformers' Pooling, same maths)."""
    hidden, m = hidden.float(), mask[..., None].float()
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(1).values
    last = mask.sum(1) - 1  # lasttoken: the last real token of each right-padded row
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def is_nomic_folder(folder: Path) -> bool:
    config = folder / CONFIG_NAME
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "nomic_bert"


def load_encoder(source: str | os.PathLike, recipe: str | None = None, max_length: int | None = None,
                 batch_tokens: int | None = None, **nomic_overrides) -> Encoder:  # fmt: skip
    """Any supported checkpoint -> an `Encoder`, read strictly (a module or pooling we cannot reproduce is an
    `EncoderError` naming it).

    ``source``: a folder or Hub id of NomicBERT (ours, published Nomic, transformers NomicBert), a
    sentence-transformers model, or a `transformers` ``AutoModel`` (mean pooling, L2). ``recipe``: force "v1"
    or "v1.5" (the Matryoshka stage trains toward v1.5); ``max_length``: cap the model's own limit;
    ``nomic_overrides``: NomicBertConfig fields for a NomicBERT checkpoint (e.g. ``rotary_scaling_factor=None``).
    """
    folder = resolve(source)
    if is_nomic_folder(folder) and not (folder / ST_MODULES).is_file():
        from nomicbert.checkpoint import load_model
        from nomicbert.tokenizer import has_tokenizer_files, load_tokenizer

        overrides = {**({"embedding_recipe": recipe} if recipe else {}), **nomic_overrides}
        model = load_model(folder, kind="encoder", **overrides)
        tokenizer = load_tokenizer(folder if has_tokenizer_files(folder) else None)
        return NomicEncoder(model, tokenizer, max_length)
    settings = read_sentence_transformers_folder(folder) if (folder / ST_MODULES).is_file() else {}
    if settings.get("model_type") == "nomic_bert":
        raise EncoderError(f"{folder}: a sentence-transformers NomicBert folder; load its parent checkpoint "
                           "(our layout) for the packed path")  # fmt: skip
    from transformers import AutoModel, AutoTokenizer

    model_dir = folder / settings.get("path", "")
    model = AutoModel.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    limit = settings.get("max_seq_length") or min(int(getattr(tokenizer, "model_max_length", 512) or 512), 8192)
    limit = min(limit, int(getattr(model.config, "max_position_embeddings", limit)))
    if max_length:
        limit = min(limit, max_length)
    return TransformersEncoder(model, tokenizer, limit, pooling=settings.get("pooling", "mean"),
                               normalize=settings.get("normalize", True),
                               recipe=recipe or settings.get("recipe", "v1"), prompts=settings.get("prompts"),
                               batch_tokens=batch_tokens)  # fmt: skip


def read_sentence_transformers_folder(folder: Path) -> dict:
    """modules.json (+ module configs) -> {"path", "pooling", "normalize", "recipe", "max_seq_length",
    "prompts", "model_type"}; Transformer -> Pooling -> [LayerNorm] -> [Normalize] is the only chain taken."""
    modules = json.loads((folder / ST_MODULES).read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    allowed = ("Transformer", "Pooling", "LayerNorm", "Normalize")
    unsupported = [k for k in kinds if k not in allowed]
    if unsupported or kinds[:2] != ["Transformer", "Pooling"]:
        raise EncoderError(f"{folder}: sentence-transformers modules {kinds} are not supported; the encoder takes "
                           "Transformer -> Pooling -> [LayerNorm] -> [Normalize]")  # fmt: skip
    by_kind = {k: m for k, m in zip(kinds, modules)}
    settings: dict = {"path": by_kind["Transformer"].get("path", ""), "normalize": "Normalize" in kinds}
    pooling_config = json.loads((folder / by_kind["Pooling"]["path"] / "config.json").read_text())
    settings["pooling"] = pooling_mode(pooling_config, folder)
    if "LayerNorm" in kinds:
        check_weightless_layer_norm(folder / by_kind["LayerNorm"]["path"])
        settings["recipe"] = "v1.5"
    st_config = folder / settings["path"] / "sentence_bert_config.json"
    if st_config.is_file():
        settings["max_seq_length"] = json.loads(st_config.read_text()).get("max_seq_length")
    prompts_file = folder / "config_sentence_transformers.json"
    if prompts_file.is_file():
        settings["prompts"] = json.loads(prompts_file.read_text()).get("prompts") or {}
    model_config = folder / settings["path"] / CONFIG_NAME
    if model_config.is_file():
        settings["model_type"] = json.loads(model_config.read_text()).get("model_type")
    return settings


def pooling_mode(config: dict, folder: Path) -> Pooling:
    """A Pooling module config (legacy ``pooling_mode_*`` flags or ``pooling_mode``) -> one supported mode."""
    if config.get("include_prompt") is False:
        raise EncoderError(f"{folder}: pooling with include_prompt=false is not supported")
    if "pooling_mode" in config:
        modes = [config["pooling_mode"]] if isinstance(config["pooling_mode"], str) else list(config["pooling_mode"])
    else:
        names = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_lasttoken": "lasttoken", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean"}  # fmt: skip
        modes = [mode for key, mode in names.items() if config.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise EncoderError(f"{folder}: pooling {modes} is not supported; one of {POOLING_MODES}")
    return modes[0]


def check_weightless_layer_norm(folder: Path) -> None:
    """Only the v1.5 LayerNorm (weight 1, bias 0) is reproduced; a trained one is an error."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    state = load_file(files[0]) if files else torch.load(folder / "pytorch_model.bin", weights_only=True)
    weight = next((v for k, v in state.items() if k.endswith("weight")), None)
    bias = next((v for k, v in state.items() if k.endswith("bias")), None)
    if weight is None or not torch.all(weight == 1) or (bias is not None and torch.any(bias != 0)):
        raise EncoderError(f"{folder}: a LayerNorm module with trained weights is not supported (only v1.5's)")
