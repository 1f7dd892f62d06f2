"""Pack: consecutive tokenized documents -> rows of exactly ``row_length`` tokens (spec §4, the reference rule).

Within one batch (the reference: a ``datasets.map`` batch of 1000 documents) all documents' ids, with their
own [CLS]/[SEP], are concatenated and cut into consecutive rows; the remainder shorter than a row is dropped
and counted; a long document spans rows. ``doc_lengths`` lists the lengths of the document pieces in each row
(they sum to ``row_length``) so a trainer can keep documents apart (one attention segment per piece) or, like
the reference, let a row attend across its documents (one segment per row).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ops import io
from ops.tokenize import list_array


def pack_arrays(ids: np.ndarray, special: np.ndarray, doc_lengths: np.ndarray, row_length: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Flat ids/special mask of consecutive documents -> (ids [R*L], special [R*L], piece lengths, pieces per row)."""
    if row_length < 2:
        raise ValueError(f"row_length must be at least 2, got {row_length}")
    rows = len(ids) // row_length
    keep = rows * row_length
    ends = np.cumsum(doc_lengths)
    cuts = np.concatenate([[0], ends[ends < keep], np.arange(row_length, keep, row_length)])
    starts = np.unique(cuts) if keep else np.zeros(0, dtype=np.int64)
    piece_lengths = np.diff(np.append(starts, keep)).astype(np.int32)
    pieces_per_row = np.diff(np.searchsorted(starts, np.arange(0, keep + 1, row_length))) if rows else np.zeros(0, int)
    return ids[:keep], special[:keep], piece_lengths, pieces_per_row


class Pack:
    """``map_batches(Pack(2048), batch_size=1000, batch_format="pyarrow")`` on `ops.tokenize.Tokenize` output.

    Output columns: ``input_ids`` (list<int32>, exactly ``row_length``), ``doc_lengths`` (list<int32>),
    ``special_tokens_mask`` (list<int8>). With ``stats_output`` set, each batch records the tokens it dropped
    in ``<stats_output>/_stats/pack/`` (named after its first document, so a retried task overwrites its own).
    """

    def __init__(self, row_length: int = 2048, stats_output: str | None = None) -> None:
        if row_length < 2:
            raise ValueError(f"row_length must be at least 2, got {row_length}")
        self.row_length, self.stats_output = row_length, stats_output

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids_col = batch.column("input_ids").combine_chunks()
        special_col = batch.column("special_tokens_mask").combine_chunks()
        doc_lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False)
        ids = ids_col.flatten().to_numpy(zero_copy_only=False)
        special = special_col.flatten().to_numpy(zero_copy_only=False)
        ids, special, pieces, per_row = pack_arrays(ids, special, doc_lengths, self.row_length)
        rows = len(per_row)
        row_lengths = np.full(rows, self.row_length)
        if self.stats_output is not None and batch.num_rows:
            self._record(batch, int(doc_lengths.sum()), len(ids))
        return pa.table({"input_ids": list_array(ids.astype(np.int32), row_lengths),
                         "doc_lengths": list_array(pieces, per_row),
                         "special_tokens_mask": list_array(special.astype(np.int8), row_lengths)})  # fmt: skip

    def _record(self, batch: pa.Table, tokens_in: int, tokens_out: int) -> None:
        first = f"{batch.column('file')[0]}:{batch.column('line')[0]}" if "file" in batch.column_names else ""
        key = hashlib.sha1(f"{first}:{batch.num_rows}:{tokens_in}".encode()).hexdigest()[:16]
        stats = {"docs": batch.num_rows, "tokens_in": tokens_in, "tokens_out": tokens_out,
                 "tokens_dropped_remainder": tokens_in - tokens_out}  # fmt: skip
        io.write_text(io.join(self.stats_output, io.STATS_DIR, "pack", f"{key}.json"), json.dumps(stats))
