"""The prepared shards as a mixed, deterministic, exactly resumable stream of training rows.

Why it is built this way:
- *Exact, O(1) resume* (TinyLlama issue #36 fast-forwards through data instead): the loader's whole
  state is how many rows each source has handed out. Which source feeds row j of step k comes
  from a generator seeded by (seed, k); which stored row a source hands out as its c-th comes
  from seeded permutations (of shards, then of rows inside a shard) per epoch. Nothing depends on
  history, so a restored count is the position.
- *Disjoint ranks*: every rank computes the same global batch of the step and reads only its own
  slice, so ranks never overlap and the stream does not depend on the number of workers.
- *Locality*: a source walks one shard at a time (rows shuffled within it), so only the current
  shard of each source is held in memory, local or on `s3://` (read through fsspec), as the narrowest
  unsigned dtype that holds the vocabulary (uint16 for 32000: a 65536-row shard of 2049 ids is 268 MB,
  not int64's 1.07 GB); batches are widened to int64 for the embedding. The shard a source reads next is
  fetched by a background thread while training consumes the current one, so a step never waits on S3.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tasks.errors import UserError
from tasks.files import read_json, sha256_file, sha256_json
from tasks.layout import Layout, shard_location
from tasks.params import Params

_TRAIN_STREAM, _VAL_STREAM = 0, 1
_CACHED_SHARDS_PER_SOURCE = 2


@dataclass(frozen=True)
class SplitInfo:
    shards: tuple[str, ...]      # URIs
    shard_rows: tuple[int, ...]  # rows per shard, from the Parquet footers

    @property
    def rows(self) -> int:
        return sum(self.shard_rows)


@dataclass(frozen=True)
class PreparedData:
    """A validated manifest: what the workers need to read rows, nothing they would have to re-check."""

    root: str
    seq_len: int
    row_len: int
    vocab_size: int
    manifest_sha256: str
    train: dict[str, SplitInfo]
    val: dict[str, SplitInfo]
    weights: dict[str, float]  # normalised, in data.sources order


def _shard_rows(uris: list[str]) -> tuple[int, ...]:
    """Row counts from the Parquet footers only (a few KB each), fetched concurrently for remote stores."""
    from concurrent.futures import ThreadPoolExecutor

    import fsspec
    import pyarrow.parquet as pq

    def rows(uri: str) -> int:
        with fsspec.open(uri, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    with ThreadPoolExecutor(max_workers=8) as pool:
        return tuple(pool.map(rows, uris))


def open_prepared(params: Params) -> PreparedData:
    """Read and check `{paths.data}/prepared/manifest.json` against the tokenizer, the model and
    the configured sources. Every mismatch is a `UserError` naming the field: training on data
    built with another tokenizer or vocabulary would run and silently learn garbage."""
    layout = Layout.from_params(params)
    root = str(layout.prepared_dir)
    if not layout.manifest.is_file():
        raise UserError(f"paths.data: no prepared data at {layout.manifest} (run `tinyllama prepare` first)")
    manifest = read_json(layout.manifest)

    vocab = params.llama_config().vocab_size
    if manifest.get("vocab_size") != vocab:
        raise UserError(f"paths.data: prepared data has vocab_size {manifest.get('vocab_size')}, the model has "
                        f"{vocab} (re-run `tinyllama prepare` with this tokenizer)")
    if manifest.get("seq_len") != params.data.seq_len or manifest.get("row_len") != params.data.seq_len + 1:
        raise UserError(f"data.seq_len: {params.data.seq_len}, but the prepared rows are seq_len "
                        f"{manifest.get('seq_len')} (re-run `tinyllama prepare`)")
    tokenizer_model = layout.tokenizer_model
    if not tokenizer_model.is_file():
        raise UserError(f"paths.models: no tokenizer at {tokenizer_model} (run `tinyllama tokenizer` first)")
    tokenizer_sha = sha256_file(tokenizer_model)
    if manifest.get("tokenizer_sha256") != tokenizer_sha:
        raise UserError(f"paths.data: prepared data was built with tokenizer sha256 "
                        f"{str(manifest.get('tokenizer_sha256'))[:12]}…, {tokenizer_model} has {tokenizer_sha[:12]}… "
                        f"(re-run `tinyllama prepare`)")

    sources = manifest.get("sources", {})
    train, val = {}, {}
    for source in params.data.sources:
        if source.name not in sources:
            raise UserError(f"data.sources[{source.name}]: not in the prepared data "
                            f"(has: {', '.join(sorted(sources)) or 'none'}; re-run `tinyllama prepare`)")
        splits = sources[source.name]["splits"]
        for split, into in (("train", train), ("val", val)):
            uris = [shard_location(root, shard) for shard in splits[split]["shards"]]
            into[source.name] = SplitInfo(tuple(uris), _shard_rows(uris))
        if train[source.name].rows == 0:
            raise UserError(f"data.sources[{source.name}]: the prepared train split has no rows")
    if not any(split.rows for split in val.values()):
        raise UserError("data.val_fraction: the prepared data has no validation rows in any source")
    total_weight = sum(s.weight for s in params.data.sources)
    return PreparedData(root=root, seq_len=manifest["seq_len"], row_len=manifest["row_len"], vocab_size=vocab,
                        manifest_sha256=sha256_json(manifest), train=train, val=val,
                        weights={s.name: s.weight / total_weight for s in params.data.sources})


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer dtype that holds every token id of the vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


class ShardCache:
    """The few most recently used shards of one split, as (rows, row_len) arrays of `dtype`; `prefetch`
    reads a shard in a background thread, and `shard` takes it from there when it is asked for."""

    def __init__(self, split: SplitInfo, dtype: np.dtype, size: int = _CACHED_SHARDS_PER_SOURCE):
        self.split, self.dtype, self.size = split, np.dtype(dtype), size
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None  # made on first use: the loader is pickled to workers

    def _read(self, index: int) -> np.ndarray:
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(self.split.shards[index], "rb") as handle:
            column = pq.read_table(handle, columns=["tokens"]).column("tokens").combine_chunks()
        return column.values.to_numpy().astype(self.dtype, copy=False).reshape(len(column), -1)

    def prefetch(self, index: int) -> None:
        if index in self._cache or index in self._pending:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        self._pending[index] = self._pool.submit(self._read, index)

    def shard(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        pending = self._pending.pop(index, None)
        rows = pending.result() if pending is not None else self._read(index)
        self._cache[index] = rows
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return rows


class SourceOrder:
    """Which stored row a source hands out as its c-th: epochs of seeded shard and row permutations."""

    def __init__(self, split: SplitInfo, seed: int, source_index: int, dtype: np.dtype):
        self.split, self.seed, self.source_index = split, seed, source_index
        self.cache = ShardCache(split, dtype)
        self._epoch: int | None = None
        self._slot: tuple[int, int] | None = None  # (epoch, slot) being read: its successor is prefetched

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.source_index, epoch]).permutation(len(self.split.shards))

    def _enter_epoch(self, epoch: int) -> None:
        self._order = self._epoch_order(epoch)
        self._ends = np.cumsum(np.asarray(self.split.shard_rows)[self._order])
        self._row_perms: dict[int, np.ndarray] = {}
        self._epoch = epoch

    def row(self, consumed: int) -> np.ndarray:
        epoch, position = divmod(consumed, self.split.rows)
        if epoch != self._epoch:
            self._enter_epoch(epoch)
        slot = int(np.searchsorted(self._ends, position, side="right"))
        shard = int(self._order[slot])
        offset = position - (int(self._ends[slot - 1]) if slot else 0)
        if self._slot != (epoch, slot):  # entering a shard: fetch the one after it in the background
            self._slot = (epoch, slot)
            after = self._order[slot + 1] if slot + 1 < len(self._order) else self._epoch_order(epoch + 1)[0]
            self.cache.prefetch(int(after))
        if shard not in self._row_perms:
            rng = np.random.default_rng([self.seed, self.source_index, epoch, shard])
            self._row_perms = {shard: rng.permutation(self.split.shard_rows[shard])}
        return self.cache.shard(shard)[self._row_perms[shard][offset]]


class MixedLoader:
    """Per step, this rank's `grad_accum` micro-batches of `micro_batch` rows, sources mixed by weight.

    Global row j of a step belongs to micro step j // (world × micro_batch) and rank
    (j // micro_batch) % world. `state()` / `load_state()` are the per-source row counts.
    """

    def __init__(self, data: PreparedData, seed: int, micro_batch: int, grad_accum: int, rank: int, world: int):
        self.names = list(data.weights)
        self.probs = np.array([data.weights[n] for n in self.names])
        self.seed, self.micro_batch, self.grad_accum, self.rank, self.world = seed, micro_batch, grad_accum, rank, world
        self.rows_per_step = micro_batch * grad_accum * world
        self.orders = [SourceOrder(data.train[n], seed, i, token_dtype(data.vocab_size))
                       for i, n in enumerate(self.names)]
        self.consumed = [0] * len(self.names)

    def state(self) -> dict[str, int]:
        return dict(zip(self.names, self.consumed))

    def load_state(self, state: dict[str, int]) -> None:
        if sorted(state) != sorted(self.names):
            raise ValueError(f"loader state has sources {sorted(state)}, this run mixes {sorted(self.names)}")
        self.consumed = [int(state[n]) for n in self.names]

    def step_batches(self, step: int) -> list[np.ndarray]:
        """This rank's micro-batches for optimizer step `step` (0-based); advances the state."""
        choices = np.random.default_rng([self.seed, _TRAIN_STREAM, step]).choice(
            len(self.names), size=self.rows_per_step, p=self.probs)
        positions = np.empty(self.rows_per_step, dtype=np.int64)
        for s in range(len(self.names)):
            picked = np.flatnonzero(choices == s)
            positions[picked] = self.consumed[s] + np.arange(len(picked))
            self.consumed[s] += len(picked)
        batches = []
        for micro in range(self.grad_accum):
            start = (micro * self.world + self.rank) * self.micro_batch
            rows = range(start, start + self.micro_batch)
            batches.append(np.stack([self.orders[choices[j]].row(int(positions[j])) for j in rows]).astype(np.int64))
        return batches


def val_batches(data: PreparedData, seed: int, micro_batch: int, n_batches: int, rank: int,
                world: int) -> list[np.ndarray]:
    """The same validation rows at every evaluation (so the curve is comparable), mixed by the training
    weights over the sources that have validation rows; this rank's `n_batches` micro-batches."""
    names = [n for n in data.weights if data.val[n].rows]
    probs = np.array([data.weights[n] for n in names])
    total = micro_batch * n_batches * world
    choices = np.random.default_rng([seed, _VAL_STREAM]).choice(len(names), size=total, p=probs / probs.sum())
    caches = {n: ShardCache(data.val[n], token_dtype(data.vocab_size), size=len(data.val[n].shards)) for n in names}
    ends = {n: np.cumsum(data.val[n].shard_rows) for n in names}
    counts = dict.fromkeys(names, 0)
    rows = []
    for choice in choices:
        name = names[choice]
        position = counts[name] % data.val[name].rows
        counts[name] += 1
        shard = int(np.searchsorted(ends[name], position, side="right"))
        offset = position - (int(ends[name][shard - 1]) if shard else 0)
        rows.append(caches[name].shard(shard)[offset])
    batches = []
    for batch in range(n_batches):
        start = (batch * world + rank) * micro_batch
        batches.append(np.stack(rows[start:start + micro_batch]).astype(np.int64))
    return batches
