"""NomicBERT: the model, its checkpoints, tokenizer, embedding API and losses. Imports no other package of ours."""

from nomicbert.attention import Segments, varlen_attention
from nomicbert.config import NomicBertConfig, preset
from nomicbert.model import (
    MaskedLMOutput,
    NomicBertForPreTraining,
    NomicBertForSequenceClassification,
    NomicBertModel,
    count_parameters,
)

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
