"""Perplexity on the prepared val split: the scale-free companion to the task scores.

Why here and not only the training loop's val loss: the table must score every milestone dir the
same way, including ones written by an earlier run, so it reads the val shards itself. Rows are
the packed `seq_len + 1` ids prepare wrote: predict ids[1:] from ids[:-1]. At most `max_rows`
rows are scored, taken from each source in proportion to its val rows, so the number is stable
across milestones and cheap on the tiny profile.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tasks.errors import UserError
from tasks.files import read_json
from tasks.layout import MANIFEST_FILE, shard_location


def read_manifest(prepared_dir: Path) -> dict:
    return read_json(Path(prepared_dir) / MANIFEST_FILE,
                     "run `tinyllama prepare` first; perplexity needs the val split")


def _source_rows(prepared_dir: Path, shards: list[str], limit: int) -> list[np.ndarray]:
    import fsspec
    import pyarrow.parquet as pq

    rows: list[np.ndarray] = []
    for shard in shards:
        if len(rows) >= limit:
            break
        with fsspec.open(shard_location(prepared_dir, shard), "rb") as handle:
            column = pq.read_table(handle, columns=["tokens"]).column("tokens").combine_chunks()
        width = len(column[0]) if len(column) else 0
        flat = column.values.to_numpy(zero_copy_only=False).reshape(-1, width) if width else np.empty((0, 0))
        rows.extend(flat[: limit - len(rows)])
    return rows


def val_rows(prepared_dir: Path, max_rows: int) -> np.ndarray:
    """(n, row_len) int64 ids: up to `max_rows`, split across sources by their val row counts."""
    manifest = read_manifest(prepared_dir)
    splits = {name: source["splits"].get("val", {}) for name, source in manifest.get("sources", {}).items()}
    total = sum(split.get("rows", 0) for split in splits.values())
    if not total:
        raise UserError(f"{Path(prepared_dir) / MANIFEST_FILE}: the val split is empty (data.val_fraction)")
    picked: list[np.ndarray] = []
    for split in splits.values():
        share = max(1, round(max_rows * split.get("rows", 0) / total)) if split.get("rows") else 0
        picked.extend(_source_rows(prepared_dir, split.get("shards", []), share))
    return np.stack(picked[:max_rows]).astype(np.int64)


def perplexity(model, rows: np.ndarray, batch_size: int) -> float:
    """exp(mean next-token NLL) over every predicted position of every row."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = torch.from_numpy(rows[start:start + batch_size]).to(device)
            logits = model(input_ids=batch[:, :-1]).logits.float()
            total_nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                         reduction="sum").item()
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
