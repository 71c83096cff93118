"""SFT rows and DPO pairs in epochs: a deterministic, exactly resumable stream of micro-batches.

The driver writes the tokenized set once, as one safetensors file beside the run's resume
checkpoints (`{run dir}/data.safetensors`, local or `s3://`), and every worker reads it. Which row a
step sees is a pure function of (seed, step): global row j of step k is item (k·rows_per_step + j)
of the stream that walks seeded permutations of the set, epoch after epoch. So the loader's state
is just how many rows the stream has handed out, and rank r takes the same slice of each step as in
pretraining (micro step m, rank r: rows (m·world + r)·micro_batch onwards).
"""

from __future__ import annotations

import numpy as np

from tasks.files import sha256_bytes

DATA_FILE = "data.safetensors"


def encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """The set as the bytes of one safetensors file (the driver hashes them into the run's fingerprint)."""
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(array) for name, array in sorted(arrays.items())})


def load_arrays(uri: str, sha256: str) -> dict[str, np.ndarray]:
    """The arrays the driver wrote, checked against the hash it recorded (a partial upload or a file
    from another run is an error, not a silently different dataset)."""
    import fsspec
    from safetensors.numpy import load

    with fsspec.open(uri, "rb") as handle:
        data = handle.read()
    if sha256_bytes(data) != sha256:
        raise ValueError(f"{uri}: does not match the sha256 the driver recorded")
    return load(data)


class EpochLoader:
    """This rank's `grad_accum` micro-batches of `micro_batch` items per step, from a set of `size`
    items (rows or pairs) in seeded per-epoch orders; `fetch(indices)` builds a micro-batch."""

    def __init__(self, size: int, fetch, seed: int, micro_batch: int, grad_accum: int, rank: int, world: int):
        self.size, self.fetch, self.seed = size, fetch, seed
        self.micro_batch, self.grad_accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.per_step = micro_batch * grad_accum * world
        self.consumed = 0
        self._orders: dict[int, np.ndarray] = {}

    def state(self) -> dict[str, int]:
        return {"items": self.consumed}

    def load_state(self, state: dict[str, int]) -> None:
        self.consumed = int(state["items"])

    def _item(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.size)}
        return int(self._orders[epoch][offset])

    def step_batches(self, step: int) -> list:
        first = step * self.per_step
        batches = []
        for micro in range(self.grad_accum):
            start = first + (micro * self.world + self.rank) * self.micro_batch
            batches.append(self.fetch(np.array([self._item(p) for p in range(start, start + self.micro_batch)])))
        self.consumed = first + self.per_step
        return batches
