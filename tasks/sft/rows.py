"""Tokenized sequences → fixed-length training rows, packed or padded.

Each sequence becomes one *segment*: inputs ids[:-1], targets ids[1:] where the id is learned
(-100 elsewhere), positions 0..n-2. Packing puts several segments in a row (best-fit decreasing,
as TRL's `bfd` strategy: a segment is never split) and the model restarts RoPE positions and keeps
attention inside each segment (`Llama.hidden_states(positions=...)`), so a packed segment computes
exactly what it would alone, without the padding. Padding puts one segment per row; the loader
trims each micro-batch to its longest row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.loss import IGNORE_INDEX
from tasks.sft.sequences import Sequence

PAD_ID = 0


@dataclass(frozen=True)
class Rows:
    inputs: np.ndarray     # (N, L) int32
    targets: np.ndarray    # (N, L) int32, IGNORE_INDEX where nothing is learned (and on padding)
    positions: np.ndarray  # (N, L) int32, each segment (and the padding after them) from 0
    lengths: np.ndarray    # (N,) int32: positions used by segments; the rest of the row is padding

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def learned_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{name}": getattr(self, name) for name in ("inputs", "targets", "positions", "lengths")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> Rows:
        return cls(*(arrays[f"{prefix}{name}"] for name in ("inputs", "targets", "positions", "lengths")))


def _empty(rows: int, length: int) -> Rows:
    return Rows(np.full((rows, length), PAD_ID, np.int32), np.full((rows, length), IGNORE_INDEX, np.int32),
                np.zeros((rows, length), np.int32), np.zeros(rows, np.int32))


def _place(rows: Rows, row: int, sequence: Sequence) -> None:
    n = len(sequence.ids) - 1
    start = rows.lengths[row]
    rows.inputs[row, start:start + n] = sequence.ids[:-1]
    rows.targets[row, start:start + n] = np.where(sequence.learn[1:], sequence.ids[1:], IGNORE_INDEX)
    rows.positions[row, start:start + n] = np.arange(n)
    rows.lengths[row] = start + n


def _pad_positions(rows: Rows) -> None:
    """The padding after the last segment counts from 0 too: a segment of its own that no target uses."""
    columns = np.arange(rows.inputs.shape[1])
    tail = columns[None, :] >= rows.lengths[:, None]
    rows.positions[tail] = (columns[None, :] - rows.lengths[:, None])[tail]


def pad(sequences: list[Sequence], length: int) -> Rows:
    rows = _empty(len(sequences), length)
    for row, sequence in enumerate(sequences):
        _place(rows, row, sequence)
    _pad_positions(rows)
    return rows


def pack(sequences: list[Sequence], length: int) -> Rows:
    """Best-fit decreasing: longest segment first, each into the row it fills most tightly."""
    sizes = np.array([len(s.ids) - 1 for s in sequences])
    if len(sizes) and sizes.max() > length:
        raise ValueError(f"a sequence of {sizes.max() + 1} ids does not fit rows of {length} positions")
    order = np.argsort(-sizes, kind="stable")
    rows_of: list[list[int]] = []
    free_rows: list[list[int]] = [[] for _ in range(length + 1)]  # by free space: rows with that much left
    has_free = np.zeros(length + 1, dtype=bool)
    for index in order:
        size = int(sizes[index])
        candidates = has_free[size:]
        fit = size + int(candidates.argmax()) if candidates.any() else None
        if fit is None:
            row, fit = len(rows_of), length
            rows_of.append([])
        else:
            row = free_rows[fit].pop()
            has_free[fit] = bool(free_rows[fit])
        rows_of[row].append(int(index))
        left = fit - size
        free_rows[left].append(row)
        has_free[left] = True
    rows = _empty(len(rows_of), length)
    for row, members in enumerate(rows_of):
        for index in members:
            _place(rows, row, sequences[index])
    _pad_positions(rows)
    return rows
