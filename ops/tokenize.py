"""Tokenize: batched fast WordPiece, each document keeping its own [CLS] ... [SEP] (spec §4).

The Rust tokenizer is called once per batch (``encode_batch``) and the result is built as Arrow list arrays
straight from flat numpy buffers, so no Python object per token is created. The tokenizer is loaded once per
worker process and reused by every later task of that process, so the operator runs as cheap Ray tasks
(and fuses with the reader); pass the class itself with an ``ActorPoolStrategy`` to pin the load to actors.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from nomicbert.tokenizer import load_tokenizer


@functools.lru_cache(maxsize=4)
def backend_tokenizer(source: str | None = None):
    """The Rust ``tokenizers.Tokenizer`` behind `load_tokenizer`, without truncation or padding."""
    backend = load_tokenizer(source).backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    return backend


def list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


class Tokenize:
    """``map_batches(Tokenize(), batch_format="pyarrow")``: ``text`` -> ``input_ids`` (list<int32>) and
    ``special_tokens_mask`` (list<int8>); ``file``/``line`` pass through so later steps can name a location."""

    def __init__(self, tokenizer: str | None = None, text_column: str = "text") -> None:
        self.tokenizer, self.text_column = tokenizer, text_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        encodings = backend_tokenizer(self.tokenizer).encode_batch(texts, add_special_tokens=True)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings] or [np.zeros(0, np.int32)])
        special = np.concatenate([np.asarray(e.special_tokens_mask, dtype=np.int8) for e in encodings]
                                 or [np.zeros(0, np.int8)])  # fmt: skip
        columns = {"input_ids": list_array(ids, lengths), "special_tokens_mask": list_array(special, lengths)}
        for keep in ("source", "file", "line"):
            if keep in batch.column_names:
                columns[keep] = batch.column(keep)
        return pa.table(columns)
