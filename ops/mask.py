"""Mask: MLM masking on the fly, seeded per row so a resumed trainer sees the same masks (spec §4).

Like HF ``DataCollatorForLanguageModeling``: each non-special token is chosen with ``mlm_probability``
(0.30 for nomic-bert-2048); a chosen token becomes [MASK] (80%), a random one of the 30522 real vocabulary ids
(10%) or stays (10%); ``labels`` hold the original id where chosen and -100 elsewhere. The random stream of a
row depends only on (seed, epoch, row_id), never on batch composition or worker count.
"""

from __future__ import annotations

import numpy as np

MASK_ID = 103
VOCAB_SIZE = 30522  # real bert-base-uncased ids; the model pads its embedding to 30528
IGNORE_INDEX = -100


def _stack(column: np.ndarray) -> np.ndarray:
    """A numpy batch column of equal-length lists (object array or 2-D) -> 2-D array."""
    return np.stack(list(column)) if column.dtype == object else np.asarray(column)


class MaskTokens:
    """``ds.map_batches(MaskTokens(0.3, seed, epoch), batch_format="numpy")``.

    Reads ``input_ids``, ``special_tokens_mask``, ``row_id``; returns the batch with masked ``input_ids``
    (same dtype, 2-D) and ``labels`` (int64, -100 where not masked). ``epoch`` changes the masks per epoch.
    """

    def __init__(self, mlm_probability: float = 0.3, seed: int = 0, epoch: int = 0, mask_id: int = MASK_ID,
                 vocab_size: int = VOCAB_SIZE, mask_fraction: float = 0.8,
                 random_fraction: float = 0.1) -> None:  # fmt: skip
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
            raise ValueError(f"mask_fraction {mask_fraction} + random_fraction {random_fraction} "
                             "must be within [0, 1]")  # fmt: skip
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be non-negative, got seed={seed} epoch={epoch}")
        self.p, self.seed, self.epoch = mlm_probability, seed, epoch
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.mask_fraction, self.random_fraction = mask_fraction, random_fraction

    def mask_row(self, ids: np.ndarray, special: np.ndarray, row_id: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, int(row_id)])
        n = len(ids)
        chosen = (rng.random(n) < self.p) & (special == 0)
        action = rng.random(n)
        random_ids = rng.integers(0, self.vocab_size, n)
        labels = np.where(chosen, ids, IGNORE_INDEX).astype(np.int64)
        out = ids.copy()
        to_mask = chosen & (action < self.mask_fraction)
        to_random = chosen & (action >= self.mask_fraction) & (action < self.mask_fraction + self.random_fraction)
        out[to_mask] = self.mask_id
        out[to_random] = random_ids[to_random].astype(ids.dtype)
        return out, labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for column in ("input_ids", "special_tokens_mask", "row_id"):
            if column not in batch:
                raise KeyError(f"MaskTokens needs column {column!r}; the batch has {sorted(batch)}")
        ids = _stack(batch["input_ids"])
        special = _stack(batch["special_tokens_mask"])
        masked, labels = np.empty_like(ids), np.empty(ids.shape, dtype=np.int64)
        for i, row_id in enumerate(batch["row_id"]):
            masked[i], labels[i] = self.mask_row(ids[i], special[i], row_id)
        return {**batch, "input_ids": masked, "labels": labels}
