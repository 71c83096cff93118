"""The decode step on a static-shape slot cache, compiled once per shape bucket (gpt-fast's way).

Why: eager decoding of a small model is dispatch-bound (hundreds of tiny ops per token, each a Python
call), and a cache whose attended length grows every step changes shapes every step, which a compiled
graph (or a CUDA graph) cannot follow. Here every shape is fixed by the bucket, not by the request:

- the cache is preallocated (slots x (max_len + spare) per layer, model/slots.py); which keys a query
  sees is data (a mask built from the fed positions: key position <= query position), so a step's
  shapes never depend on which sequence sits in which row. A step attends over the keys its longest
  row needs, rounded up: on CPU to a multiple of `ATTENDED`, a dynamic dimension of the same graphs (no
  recompile as contexts grow; 55M at batch 1: attending over the whole cache, scratch tail included,
  cost a quarter of the int8 step); on CUDA to a length bucket (64, 128, 256, ... `max_len`), the same
  inductor graph recorded as one CUDA graph per length (attending over all 2048 positions read ~1.5 GB
  of the 1.1B's KV a step at 32 slots, whatever the contexts' lengths);
- a step feeds `B` rows (B: a batch bucket), `W` tokens each (W: a width bucket, 1 for plain decoding,
  k + 1 for a speculative verify). On CPU the rows are the slots being fed, in any order, padded to
  the bucket (`DecodeStep.rows`): the step costs what the running sequences need, wherever the prompt
  cache put them (a lone request in slot 7 used to decode at bucket 8: 55M, 8 sequential requests,
  63-70 tok/s before, 112-128 after). On CUDA they are the first B slots, B the bucket past the highest
  in use, and the cache is read as a view. Rows and columns with nothing to feed (padding, a free slot,
  a row short of W) write to the cache's scratch tail past `max_len`, which no query reads, and their
  logits are ignored;
- on CPU the batch dimension is dynamic too: one inductor graph for every bucket >= 2 and one for a lone row
  (torch specializes a size of 1). Feeding a lone row as two instead would save that compile but not
  its cost: a 2-row GEMM is not a GEMV's price on CPU BLAS (measured with MKL on this project's 2-core
  machines: the 32000 x 512 output projection takes 7.5 ms for 1 row, 16.5 ms for 2; the 55M config's
  compiled step 36.5 ms for a lone row fed as two against the eager step's 28.1 ms). On CUDA each bucket
  is its own static graph, captured as a CUDA graph (`mode="reduce-overhead"`), the cache being a module
  buffer so the graph's addresses stay fixed. `DecodeStep(static=True)` runs CUDA's layout on any device
  (static batch buckets, first-B rows, length buckets), so the CPU tests cover it.

`warm_up()` compiles every bucket at load, so no request pays for compilation. The step returns
the logits of every fed position (B, W, vocab) with each row's penalties applied (model/sampling.py
`SlotPenalties`: per-slot settings and token counts, read as data, so a request's penalties never
recompile it), and the raw log-softmax of the same positions (what a request's `logprobs` report).
A verify step's drafted guesses count as generated tokens for the columns after them, so speculative
decoding stays exact under penalties. What the caller does with the logits (argmax, sampling) is the
caller's, on the device, before one transfer to the host. Compiled and eager steps run the same code
(`compile=False` is the eager engine, for debugging). On CPU a step's model has its large fp32 linear layers
packed for oneDNN first (model/packed.py; MKL's small-M GEMM streams weights at a third of the bandwidth on
some CPUs; the tiny preset's weights are all below the size where that pays, and stay as they are), and a compiled
step of one row runs no BLAS or oneDNN matmul at all: its linear layers are a multiply and a sum that inductor
writes as its own loops over the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from itertools import accumulate

import torch
from torch import nn

from model.packed import pack_linears
from model.sampling import SlotPenalties, penalize
from model.slots import SlotCache

ATTENDED = 64  # on CPU a step attends over the first multiple of this many cache positions that its rows need


_reserved_graphs = 0  # graphs the compiled steps of this process may hold, all on `StaticStep.forward`'s code


def _reserve_graphs(graphs: int) -> None:
    """Let Dynamo compile `graphs` more graphs of the step's code. It allows `recompile_limit` (8) per code
    object and fails past it (`fullgraph`), counting every `StaticStep` of the process together (they share
    `forward`'s code; modules are inlined, not told apart by identity). A step compiles one graph per
    (batch bucket, width) by design: 12 on CUDA for 32 slots verifying 4 guesses (the 1.1B profile's replica),
    and a process may hold several steps (a target and its draft, a benchmark's contenders)."""
    global _reserved_graphs
    _reserved_graphs += graphs
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _reserved_graphs)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, _reserved_graphs)


def doublings(first: int, last: int) -> tuple[int, ...]:
    """first, 2 first, 4 first, ... below `last`, then `last` itself."""
    sizes, size = [], first
    while size < last:
        sizes.append(size)
        size *= 2
    return (*sizes, last)


def batch_buckets(slots: int) -> tuple[int, ...]:
    """1, 2, 4, ... and `slots` itself: the batch sizes a step is compiled for."""
    return doublings(1, slots)


def length_buckets(max_len: int) -> tuple[int, ...]:
    """64, 128, 256, ... and `max_len` itself: the key lengths a static-layout step attends over."""
    return doublings(ATTENDED, max_len)


class _Rows:
    """The cache as `Attention` sees it in a step: write this step's keys/values of row i into slot
    `slots[i]` at its positions (the scratch tail included), return those slots' first `length` positions.
    `length` never reaches the scratch tail: no query attends past `max_len`, so the tail is written, never
    read. `gather`: the slots are any (CPU: a gathered copy, small at decode lengths); else they are
    0..B-1 and read as a view (CUDA)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], positions: torch.Tensor, length: int,
                 slots: torch.Tensor, gather: bool):
        self.k, self.v, self.positions, self.length = k, v, positions, length
        self.slots, self.gather = slots, gather

    def update(self, layer: int, pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer][self.slots[:, None], :, self.positions] = k.transpose(1, 2)
        self.v[layer][self.slots[:, None], :, self.positions] = v.transpose(1, 2)
        return self.read(self.k[layer][:, :, :self.length]), self.read(self.v[layer][:, :, :self.length])

    def read(self, per_slot: torch.Tensor) -> torch.Tensor:
        """The step's rows of a per-slot tensor."""
        return per_slot[self.slots] if self.gather else per_slot[:self.slots.shape[0]]


class StaticStep(nn.Module):
    """`forward(idx, positions, drafted, keys, slots)`: (B, W) token ids fed at (B, W) cache positions of
    the (B,) `slots`, attending over the cache positions `keys` → (B, W, vocab) penalized logits and
    (B, W, vocab) raw log-probabilities (None without `penalties`: a draft model's step). `drafted` (B, W)
    marks the fed tokens that are guesses, not yet counted as generated. The cache's and the penalties'
    tensors are this module's buffers (shared with `cache` and `penalties`, so the eager prefill and the
    decoder's bookkeeping write into the same memory)."""

    def __init__(self, model, cache: SlotCache, penalties: SlotPenalties | None = None, gather: bool = True):
        super().__init__()
        self.model = model
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            self.register_buffer(f"k{layer}", k, persistent=False)
            self.register_buffer(f"v{layer}", v, persistent=False)
        self.register_buffer("key_positions", torch.arange(cache.max_len, device=cache.device), persistent=False)
        self.penalized = penalties is not None
        if penalties is not None:
            for name in ("counts", "prompt", "presence", "frequency", "repetition"):
                self.register_buffer(f"penalty_{name}", getattr(penalties, name), persistent=False)
        self.last_rope = model.config.max_seq_len - 1
        self.gather = gather  # see DecodeStep.rows: any slots (CPU's layout), or the first B (CUDA's)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor, drafted: torch.Tensor, keys: torch.Tensor,
                slots: torch.Tensor, process: bool = True):
        model = self.model
        rope = positions.clamp(max=self.last_rope)  # scratch positions: any angle will do
        cos, sin = model.rope_cos[rope][:, None], model.rope_sin[rope][:, None]
        mask = (keys <= positions[:, :, None])[:, None]
        n = len(model.layers)
        cache = _Rows([getattr(self, f"k{i}") for i in range(n)], [getattr(self, f"v{i}") for i in range(n)], positions,
                      keys.shape[0], slots, self.gather)
        x = model.embed_tokens(idx)
        for layer in model.layers:
            x = layer(x, cos, sin, 0, cache, mask)
        logits = model.lm_head(model.norm(x)).float()
        if not (self.penalized and process):
            return logits, None
        # column j predicts the token after fed token j: the guesses up to and including j count as generated
        guesses = torch.zeros_like(logits).scatter_(-1, idx[:, :, None], drafted[:, :, None].to(logits.dtype))
        # the running sum over the (static, few) columns as adds inductor fuses; aten's cumsum is a
        # fallback kernel (~90 us a step at a 32k vocab), and a plain decode step's one column needs none
        guesses = torch.cat(list(accumulate(guesses.split(1, dim=1))), dim=1)
        counts = cache.read(self.penalty_counts)[:, None] + guesses
        penalized = penalize(logits, counts, cache.read(self.penalty_prompt)[:, None],
                             cache.read(self.penalty_presence), cache.read(self.penalty_frequency),
                             cache.read(self.penalty_repetition))
        return penalized, logits.log_softmax(-1)


class DecodeStep:
    """A `StaticStep` for a slot cache, eager or compiled, fed per bucket; `run` pads a step's rows to
    its buckets, and `warm_up` compiles each (batch bucket, width) before the first request. `static`: the
    layout CUDA graphs need (static batch buckets, the first B slots as rows, length buckets); default: on
    CUDA only."""

    def __init__(self, model, cache: SlotCache, widths: Sequence[int] = (1,), compile: bool = False,
                 penalties: SlotPenalties | None = None, static: bool | None = None):
        self.cache, self.widths = cache, tuple(sorted(set(widths)))
        if self.widths[-1] > cache.spare:
            raise ValueError(f"width {self.widths[-1]} exceeds the cache's scratch tail of {cache.spare}")
        self.device = cache.device
        if self.device.type == "cpu":  # large fp32 weights through oneDNN (model/packed.py); training is unaffected
            pack_linears(model)
        self.static = self.device.type == "cuda" if static is None else static
        self.module = StaticStep(model, cache, penalties, gather=not self.static)
        self.compiled = compile
        # On CPU one graph with a dynamic batch dim serves every bucket >= 2, and torch specializes a size of 1
        # into a second graph (see the module docstring for why a lone row is not fed as two).
        self.dynamic = compile and not self.static
        self.buckets = batch_buckets(cache.slots)
        self.lengths = length_buckets(cache.max_len) if self.static else (cache.max_len,)
        self.fn = self.module
        self.warm = False  # every bucket compiled: guards are then only checked to pick the bucket's graph
        if compile:
            _reserve_graphs(len(self.buckets) * len(self.widths))  # CUDA's count; CPU needs two per width
            cuda = self.device.type == "cuda"
            # CUDA graphs need static shapes: one graph per bucket. On CPU, a dynamic batch dim is one graph,
            # called through a C++ wrapper (inductor's Python wrapper costs ~0.1 ms a step at these sizes).
            # The bound forward, not the module: no nn.Module call layers around the compiled frame.
            self.fn = torch.compile(self.module.forward, mode="reduce-overhead" if cuda else None,
                                    dynamic=False if self.static else None, fullgraph=True,
                                    options=None if cuda else {"cpp_wrapper": True})

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def width(self, tokens: int) -> int | None:
        """The width bucket that holds `tokens` fed per row (None: wider than any, feed it eagerly)."""
        return next((w for w in self.widths if w >= tokens), None)

    def rows(self, slots: Sequence[int]) -> tuple[list[int], list[int]]:
        """(the slot each row of the step feeds, the row of each of `slots`). On CPU the rows are `slots`
        themselves, padded to a batch bucket with the first (padding rows write only scratch positions):
        a step costs what the running sequences need whatever slots they hold (CPU BLAS's small-M GEMM
        time grows with the rows, and with the prompt cache a lone request may sit in a high slot). On
        CUDA they are the first B slots, B the bucket past the highest (a GEMM of a few rows costs what one
        does there, and the cache is read as a view, not gathered)."""
        if self.static:
            return list(range(self.bucket(max(slots) + 1))), list(slots)
        b = self.bucket(len(slots))
        return [*slots, *[slots[0]] * (b - len(slots))], list(range(len(slots)))

    def attended(self, end: int) -> torch.Tensor:
        """The cache positions a step attends over when its rows' real tokens end before `end`: on CPU the
        first multiple of `ATTENDED` that holds them (a dynamic dimension of the graphs: attention then
        costs what the longest row's context needs, not the whole cache's); in the static layout the first
        length bucket that holds them (a CUDA graph's shapes are static: one recorded per length)."""
        if self.static:
            length = next(n for n in self.lengths if n >= end)
        else:
            length = min(self.cache.max_len, -(-end // ATTENDED) * ATTENDED)
        return self.module.key_positions[:length]

    def __call__(self, idx: torch.Tensor, positions: torch.Tensor, drafted: torch.Tensor, keys: torch.Tensor,
                 slots: torch.Tensor, process: bool = True):
        if self.compiled:  # one inductor graph for every key length (on CUDA, recorded per length bucket)
            torch._dynamo.mark_dynamic(keys, 0, min=2, max=self.cache.max_len)
        if self.dynamic:
            if idx.shape[0] > 1:
                for tensor in (idx, positions, drafted, slots):
                    torch._dynamo.mark_dynamic(tensor, 0, min=2, max=self.buckets[-1])
        # compiled: always the one graph that penalizes (as data); eager: that work only when a row needs it.
        # After warm-up, only the guards that tell the buckets' graphs apart are evaluated (all of them cost
        # ~0.1 ms a step: one per weight); a shape no graph covers raises rather than run a wrong graph.
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if self.warm else nullcontext():
            out = self.fn(idx, positions, drafted, keys, slots, process or self.compiled)
        if self.compiled and self.device.type == "cuda":  # CUDA graphs reuse their outputs
            return tuple(None if o is None else o.clone() for o in out)
        return out

    def run(self, slots: Sequence[int], starts: Sequence[int], chunks: Sequence[Sequence[int]],
            counted: Sequence[int] | None = None, process: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed `chunks[i]` at positions `starts[i]`.. of slot `slots[i]`; returns the (len(slots), W, vocab)
        logits grid, row i = slot `slots[i]`, column j = the j-th token fed to it (padding columns: ignore), and
        the raw log-probabilities of the same grid (None for a step without penalties, or an eager one
        told that no row needs them: `process=False`). `counted[i]`: the slot's tokens before that
        position are counted in its penalties already; fed tokens from there on are guesses (default:
        none are)."""
        width = self.width(max(len(c) for c in chunks))
        if width is None:
            raise ValueError(f"a row feeds {max(len(c) for c in chunks)} tokens; "
                             f"the widest bucket is {self.widths[-1]}")
        with torch.inference_mode():
            return self._run(slots, starts, chunks, counted, width, process)

    def _run(self, slots, starts, chunks, counted, width: int, process: bool):
        # built as lists, then one tensor each: per-row tensor ops cost more than the tiny model's step
        fed_slots, row_of = self.rows(slots)
        b = len(fed_slots)
        scratch = range(self.cache.max_len, self.cache.max_len + width)
        idx, positions = [[0] * width for _ in range(b)], [list(scratch) for _ in range(b)]
        drafted = [[False] * width for _ in range(b)]
        for i, (row, start, chunk) in enumerate(zip(row_of, starts, chunks)):
            fed = range(start, start + len(chunk))
            idx[row][:len(chunk)], positions[row][:len(chunk)] = chunk, fed
            if counted is not None:
                drafted[row][:len(chunk)] = [p >= counted[i] for p in fed]
        keys = self.attended(max(start + len(chunk) for start, chunk in zip(starts, chunks)))
        out = self(torch.tensor(idx, dtype=torch.long, device=self.device),
                   torch.tensor(positions, dtype=torch.long, device=self.device),
                   torch.tensor(drafted, dtype=torch.bool, device=self.device), keys,
                   torch.tensor(fed_slots, dtype=torch.long, device=self.device), process)
        if not self.static:  # rows are `slots` themselves, padded
            return tuple(None if o is None else o[:len(slots)] for o in out)
        rows = torch.tensor(row_of, device=self.device)
        return tuple(None if o is None else o[rows] for o in out)

    def warm_up(self) -> None:
        """Run every (batch bucket, width, length bucket) once (CUDA graphs: three times, to record them) on
        scratch positions only, so compilation happens now, not on a request's path; the cache's real
        entries are untouched. The key length is a dynamic dimension: one inductor graph serves every
        length, so more lengths cost CUDA graph recordings, not compiles."""
        if not self.compiled:
            return
        repeats = 3 if self.device.type == "cuda" else 1
        with torch.inference_mode():
            for length in self.lengths:
                keys = self.module.key_positions[:length]
                for width in self.widths:
                    for b in self.buckets:
                        positions = torch.arange(self.cache.max_len, self.cache.max_len + width).repeat(b, 1)
                        idx = torch.zeros((b, width), dtype=torch.long, device=self.device)
                        slots = torch.arange(b, device=self.device)
                        for _ in range(repeats):
                            self(idx, positions.to(self.device), torch.zeros_like(idx, dtype=torch.bool), keys,
                                 slots)
        self.warm = True
