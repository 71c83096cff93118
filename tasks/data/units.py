"""Sealed token units: one input file's tokens, kept on the driver's disk across runs.

Phase 1 of `prepare` turns every input (a unit) into three files in `{staging}/units/<source>/`:
`<key>.ids` (every document's ids, separators included, back to back), `<key>.lengths` (ids per
document, int64) and, written last and atomically, `<key>.json`: the input's sha256, its row and skip
counts and the sha256 of the two data files. `key` is a hash of everything that decides those bytes
(the input's URI, size and version stamp, the source's parsing settings, the tokenizer, the separator,
the dtype), so a unit made from other input or settings is never found. A unit without its seal, or
whose files do not match it, is not trusted: it is made again. Phase 2 packs units in input order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.files import sha256_file, sha256_json, write_json_atomic

UNIT_VERSION = 1
IDS, LENGTHS, SEAL = ".ids", ".lengths", ".json"


@dataclass(frozen=True)
class Unit:
    """One input of one source, as the driver lists it (typed: it crosses to the Ray workers)."""

    index: int        # position in the run's fixed order (sources in params order, inputs sorted)
    source: str       # data.sources[].name
    uri: str          # the input ('builtin://…' for the embedded corpus)
    key: str          # content key of its sealed files (see module doc)


def unit_key(uri: str, stamp: dict, settings: dict) -> str:
    return sha256_json({"version": UNIT_VERSION, "uri": uri, "stamp": stamp, "settings": settings})[:32]


@dataclass
class Sealed:
    """A sealed unit's record (the `.json` file)."""

    uri: str
    input_sha256: str
    rows: int
    skipped: dict
    documents: int
    ids: int
    ids_sha256: str
    lengths_sha256: str


class UnitWriter:
    """Appends one unit's parts as they arrive, then seals it: data files renamed into place, seal last."""

    def __init__(self, directory: Path, key: str, dtype: np.dtype):
        self.directory, self.key, self.dtype = directory, key, np.dtype(dtype)
        directory.mkdir(parents=True, exist_ok=True)
        self._ids = open(directory / f"{key}{IDS}.partial", "wb")
        self._lengths = open(directory / f"{key}{LENGTHS}.partial", "wb")
        self._ids_sha, self._lengths_sha = hashlib.sha256(), hashlib.sha256()
        self.parts, self.rows, self.documents, self.n_ids = 0, 0, 0, 0
        self.skipped: Counter = Counter()

    def append(self, ids: bytes, lengths: bytes, rows: int, skipped: dict) -> None:
        for handle, digest, data in ((self._ids, self._ids_sha, ids), (self._lengths, self._lengths_sha, lengths)):
            handle.write(data)
            digest.update(data)
        self.parts += 1
        self.rows += rows
        self.documents += len(lengths) // 8
        self.n_ids += len(ids) // self.dtype.itemsize
        self.skipped.update(skipped)

    def seal(self, uri: str, input_sha256: str) -> Sealed:
        for handle in (self._ids, self._lengths):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for suffix in (IDS, LENGTHS):
            os.replace(self.directory / f"{self.key}{suffix}.partial", self.directory / f"{self.key}{suffix}")
        sealed = Sealed(uri, input_sha256, self.rows, dict(self.skipped), self.documents, self.n_ids,
                        self._ids_sha.hexdigest(), self._lengths_sha.hexdigest())
        write_json_atomic(self.directory / f"{self.key}{SEAL}", sealed.__dict__)
        return sealed

    def discard(self) -> None:
        for handle in (self._ids, self._lengths):
            handle.close()
        for suffix in (IDS, LENGTHS):
            (self.directory / f"{self.key}{suffix}.partial").unlink(missing_ok=True)


def load_sealed(directory: Path, unit: Unit, dtype: np.dtype) -> Sealed | None:
    """The unit's record if it is sealed and its files match the seal (size and sha256), else None (and
    whatever half of it is there is removed)."""
    seal = directory / f"{unit.key}{SEAL}"
    try:
        sealed = Sealed(**json.loads(seal.read_text()))
        ids, lengths = directory / f"{unit.key}{IDS}", directory / f"{unit.key}{LENGTHS}"
        if (sealed.uri == unit.uri and ids.stat().st_size == sealed.ids * np.dtype(dtype).itemsize
                and lengths.stat().st_size == sealed.documents * 8 and sha256_file(ids) == sealed.ids_sha256
                and sha256_file(lengths) == sealed.lengths_sha256):
            return sealed
    except (OSError, ValueError, TypeError):
        pass
    for suffix in (SEAL, IDS, LENGTHS, f"{IDS}.partial", f"{LENGTHS}.partial"):
        (directory / f"{unit.key}{suffix}").unlink(missing_ok=True)
    return None


@dataclass
class UnitTokens:
    """A sealed unit's data, memory-mapped: packing reads it a block at a time."""

    ids: np.ndarray
    lengths: np.ndarray
    sealed: Sealed = field(repr=False)


def open_unit(directory: Path, unit: Unit, sealed: Sealed, dtype: np.dtype) -> UnitTokens:
    def mapped(suffix: str, kind, count: int) -> np.ndarray:
        if not count:
            return np.empty(0, dtype=kind)
        return np.memmap(directory / f"{unit.key}{suffix}", dtype=kind, mode="r", shape=(count,))

    return UnitTokens(mapped(IDS, dtype, sealed.ids), mapped(LENGTHS, np.int64, sealed.documents), sealed)
