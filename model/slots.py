"""A KV cache of slots: one row per running sequence, so sequences of different lengths decode together.

Why slots rather than one cache per sequence: a server's running batch changes every step (requests
join and leave), and a decode step should be *one* forward over all of it. Each sequence owns a
slot (a row of the cache) for its lifetime; a forward names the rows it feeds and, per row, the
positions of its tokens (`SlotBatch`). Rows may feed different numbers of tokens (a prefill chunk,
a speculative block): shorter rows are padded, and padding writes only into a scratch tail past
`max_len` that no real query ever reads. The attention mask is per row: a query at position p sees
its own row's keys 0..p, which are exactly that sequence's tokens, whatever stale entries (rejected
speculative guesses, a previous occupant) lie beyond.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.config import LlamaConfig


class SlotCache:
    """Keys/values for `slots` sequences of up to `max_len` tokens each, plus a `spare`-token scratch tail."""

    def __init__(self, config: LlamaConfig, slots: int, max_len: int, spare: int, dtype: torch.dtype, device):
        if slots < 1:
            raise ValueError(f"slots: must be >= 1, got {slots}")
        self.slots, self.max_len, self.spare = slots, max_len, spare
        # One tensor per layer, not one for all: a compiled step writes each in place (an index_put into a
        # view of a shared tensor makes inductor copy the whole layer out and back every step).
        shape = (slots, config.n_kv_head, max_len + spare, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.device = torch.device(device)

    @classmethod
    def for_model(cls, model, slots: int, max_len: int | None = None, spare: int = 1) -> SlotCache:
        """A cache for `model` (a `Llama`), of its dtype and device; `max_len` defaults to its context,
        `spare` is the most tokens one row feeds per forward."""
        config = model.config
        max_len = min(max_len or config.max_seq_len, config.max_seq_len)
        weight = model.embed_tokens.weight  # the activations' dtype, also when the linears are int8 (model/quant.py)
        return cls(config, slots, max_len, spare, weight.dtype, weight.device)

    def batch(self, rows: Sequence[int], starts: Sequence[int], counts: Sequence[int]) -> SlotBatch:
        """One forward's view: row i feeds `counts[i]` tokens at positions `starts[i]`, `starts[i] + 1`, ...
        (the tokens its slot's cache lacks)."""
        return SlotBatch(self, rows, starts, counts)


class SlotBatch:
    """The rows of a `SlotCache` one forward writes and reads; passed to `Llama` as its cache.

    `positions` (rows, width) are the RoPE positions of the fed tokens (padding: scratch positions
    `max_len + j`), `mask` (rows, 1, width, length) the per-row causal mask over the first `length`
    cache positions (the longest row's), `real` which fed tokens are not padding.
    """

    def __init__(self, cache: SlotCache, rows: Sequence[int], starts: Sequence[int], counts: Sequence[int]):
        width = max(counts)
        if width > cache.spare:
            raise ValueError(f"a row feeds {width} tokens; the cache's scratch tail holds {cache.spare}")
        ends = [s + c for s, c in zip(starts, counts)]
        if max(ends) > cache.max_len:
            raise ValueError(f"sequence of {max(ends)} tokens exceeds the context of {cache.max_len}")
        device = cache.device
        self.cache = cache
        self.rows = _as_index(rows)
        self.row_ids = torch.tensor(list(rows), device=device)
        offsets = torch.arange(width, device=device)
        self.real = offsets < torch.tensor(list(counts), device=device)[:, None]
        starts_t = torch.tensor(list(starts), device=device)[:, None]
        self.positions = torch.where(self.real, starts_t + offsets, cache.max_len + offsets)
        self.length = max(ends)
        keys = torch.arange(self.length, device=device)
        self.mask = (keys <= self.positions[:, :, None])[:, None]

    def update(self, layer: int, pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values (batch, kv_heads, width, head_dim) at their positions;
        return every row's keys/values up to `length`."""
        index = (self.row_ids[:, None], slice(None), self.positions)
        self.cache.k[layer][index] = k.transpose(1, 2)
        self.cache.v[layer][index] = v.transpose(1, 2)
        return (self.cache.k[layer][self.rows, :, :self.length],
                self.cache.v[layer][self.rows, :, :self.length])


def _as_index(rows: Sequence[int]) -> slice | torch.Tensor:
    """Consecutive slots as a slice, so reading them is a view rather than a gather copy."""
    rows = list(rows)
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows)


def forward_rows(model, cache: SlotCache, rows: Sequence[int], starts: Sequence[int],
                 chunks: Sequence[Sequence[int]], keep: Sequence[int]) -> list[torch.Tensor]:
    """Feed `chunks[i]` into slot `rows[i]` at position `starts[i]` in one forward of `model`;
    returns, per row, the (keep[i], vocab) logits of its last `keep[i]` fed tokens (only those
    rows reach the vocabulary projection, the costly part for a small model)."""
    counts = [len(c) for c in chunks]
    width = max(counts)
    device = cache.device
    idx = torch.zeros((len(chunks), width), dtype=torch.long, device=device)
    for i, chunk in enumerate(chunks):
        idx[i, :len(chunk)] = torch.as_tensor(chunk, dtype=torch.long)
    hidden = model.hidden_states(idx, 0, cache.batch(rows, starts, counts))
    picked = [hidden[i, n - k:n] for i, (n, k) in enumerate(zip(counts, keep))]
    logits = model.lm_head(torch.cat(picked))
    return list(logits.split(list(keep)))
