"""Parquet shards of packed rows: one column `tokens` of `list<uint16>` (uint32 for vocabularies
of 65536 or more), `rows_per_shard` rows per file in row groups of `row_group_rows`, so a reader
can seek to any row group without reading the shard.

Rows are buffered only up to one row group, which keeps memory flat however big the corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.files import sha256_file


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 65536 else np.uint32)


def _arrow(values: np.ndarray) -> pa.Array:
    """A numpy vector as an Arrow array over the same memory (`pa.array` would also import
    pandas, seconds of startup for a stage that never uses it)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def rows_to_table(rows: np.ndarray) -> pa.Table:
    """(n, row_len) ids -> a one-column table of list<uint16|uint32>, without copying per row."""
    n, row_len = rows.shape
    offsets = _arrow(np.arange(0, (n + 1) * row_len, row_len, dtype=np.int32))
    return pa.Table.from_arrays([pa.ListArray.from_arrays(offsets, _arrow(rows.reshape(-1)))], names=["tokens"])


class ShardWriter:
    """Writes `<root>/<prefix>/shard-00000.parquet`, ... and remembers each one's manifest entry and sha256.

    `publish(local_path) -> entry`, called as each shard is closed, decides where it ends up: by default it
    stays where it is and its entry is its path relative to `root`; prepare's shared store uploads it under
    its content hash and deletes the local file, so at most one shard per writer is ever on local disk."""

    def __init__(self, root: Path, prefix: str, row_len: int, dtype: np.dtype,
                 rows_per_shard: int, row_group_rows: int, publish: Callable[[Path, str], str] | None = None):
        self.root, self.prefix = root, prefix
        self.publish = publish or (lambda path, sha256: str(path.relative_to(root)))
        self.sha256: dict[str, str] = {}
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = min(row_group_rows, rows_per_shard)
        self.pending = np.empty((0, row_len), dtype=dtype)
        self.schema = pa.schema([("tokens", pa.list_(pa.from_numpy_dtype(dtype)))])
        self.shards: list[str] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0

    def write(self, rows: np.ndarray) -> None:
        self.pending = np.concatenate([self.pending, rows]) if len(self.pending) else rows
        while len(self.pending) >= self._next_group():
            self._flush(self._next_group())

    def close(self) -> None:
        """Write the rows still buffered and close the last shard."""
        while len(self.pending):
            self._flush(min(len(self.pending), self._next_group()))
        if self._writer is not None:
            self._close_shard()

    def _next_group(self) -> int:
        """A row group never straddles two shards."""
        return min(self.row_group_rows, self.rows_per_shard - self._rows_in_shard)

    def _close_shard(self) -> None:
        self._writer.close()
        self._writer = None
        local = self.root / f"{self.prefix}/shard-{len(self.shards):05d}.parquet"
        digest = sha256_file(local)
        entry = self.publish(local, digest)
        self.shards.append(entry)
        self.sha256[entry] = digest

    def _flush(self, n: int) -> None:
        if self._writer is None:
            relative = f"{self.prefix}/shard-{len(self.shards):05d}.parquet"
            (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.root / relative, self.schema, compression="zstd")
        self._writer.write_table(rows_to_table(self.pending[:n]), row_group_size=n)
        self.pending = self.pending[n:]
        self.rows += n
        self._rows_in_shard += n
        if self._rows_in_shard == self.rows_per_shard:
            self._close_shard()
            self._rows_in_shard = 0
