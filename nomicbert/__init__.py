"""NomicBERT: the model, its checkpoints, tokenizer, embedding API and losses. Imports no other package of ours.

Names are imported on first use, so ``python -m nomicbert`` checks its arguments before it pays for torch.
"""

from importlib import import_module

_EXPORTS = {
    "MaskedLMOutput": "nomicbert.model",
    "NomicBertConfig": "nomicbert.config",
    "NomicBertForPreTraining": "nomicbert.model",
    "NomicBertForSequenceClassification": "nomicbert.model",
    "NomicBertModel": "nomicbert.model",
    "Segments": "nomicbert.attention",
    "count_parameters": "nomicbert.model",
    "preset": "nomicbert.config",
    "varlen_attention": "nomicbert.attention",
}
__all__ = [
    "MaskedLMOutput",
    "NomicBertConfig",
    "NomicBertForPreTraining",
    "NomicBertForSequenceClassification",
    "NomicBertModel",
    "Segments",
    "count_parameters",
    "preset",
    "varlen_attention",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nomicbert' has no attribute {name!r}")
