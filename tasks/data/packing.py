"""Packing a stream of token ids into fixed rows, and the train/val split by document.

Rows are `seq_len + 1` ids back to back, with no overlap: training reads `row[:-1]` as input
and `row[1:]` as target (as lit-gpt's packed dataset, which TinyLlama trained on). Documents
run across row boundaries; only the partial row left at the very end is dropped (TinyLlama
issue #83), and `dropped` says how many ids that was, so `rows * row_len + dropped` is exactly
the number of ids that went in.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A fixed, well-mixed 64-bit hash (SplitMix64's finalizer), vectorized over uint64."""
    z = values.astype(np.uint64) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def is_val(doc_indices: np.ndarray, val_fraction: float) -> np.ndarray:
    """Which documents (by their index within the source) go to validation.

    A hash of the index rather than a running counter or an RNG stream, so the split of a
    document never depends on chunking, worker count or what else is in the corpus.
    """
    with np.errstate(over="ignore"):
        hashed = _splitmix64(doc_indices)
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction


class Packer:
    """Cuts the concatenated ids into rows of `row_len`, carrying the remainder over."""

    def __init__(self, row_len: int, dtype):
        self.row_len = row_len
        self.leftover = np.empty(0, dtype=dtype)

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Append ids; return the rows they complete, shape (n, row_len) (n may be 0)."""
        buffer = np.concatenate([self.leftover, ids.astype(self.leftover.dtype, copy=False)])
        full = len(buffer) // self.row_len * self.row_len
        self.leftover = buffer[full:].copy()
        return buffer[:full].reshape(-1, self.row_len)

    @property
    def dropped(self) -> int:
        """Ids in the final partial row (dropped when the stream ends)."""
        return len(self.leftover)
