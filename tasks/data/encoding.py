"""Phase 1 of `prepare` on a worker: one input (a unit) parsed, tokenized and sent back in parts.

`UnitEncoder` is a Ray Data callable class, so each actor loads the tokenizer once (pinned to one
thread: the actor pool already uses every CPU `data.encode_processes` gives it). For one unit it reads
the input as a stream of chunks (`SourceReader.input_chunks`), tokenizes each chunk and sends the ids
back in parts of about `PART_IDS` ids, numbered, so a worker holds at most one part plus one chunk
whatever the file size, and the driver (which seals units, tasks/data/units.py) can drop a part it has
already seen when Ray re-runs the task of a worker that died.

A storage fault (timeout, 5xx, connection reset) is retried `READ_ATTEMPTS` times with bounded
backoff, re-reading the input from its start but sending only the parts not sent yet; a broken input
or bad settings travel back as an `error` row (one line naming the field and the file), which the
driver raises as a `UserError`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from model.tokenizer import BOS_ID, EOS_ID
from tasks.data import sources
from tasks.data.sources import Chunk, SourceReader, _unreadable, is_transient, parse_chunk, read_errors
from tasks.errors import UserError

PART_IDS = 1 << 20
"""Ids per part sent back (2-4 MB): the block that bounds a worker's memory."""
READ_ATTEMPTS = 5
BACKOFF_S = (0.5, 1.0, 2.0, 4.0)
"""Waits between attempts at reading an input (about 8 s in all, then the stage fails: not exit 2,
so the flow retries it)."""

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    ids: np.ndarray            # every document's ids, separators included, back to back
    lengths: np.ndarray        # ids per document (int64), in order
    rows: int                  # input rows the chunk held
    skipped: dict              # reason -> rows skipped


def encode_chunk(tokenizer, source, separator: str, dtype, chunk: Chunk) -> Encoded:
    """Parse and tokenize one chunk; the separator policy puts BOS before each document (as
    TinyLlama's real run did, see its issue #40), EOS after it, or both."""
    parsed = parse_chunk(source, chunk)
    documents = tokenizer.encode_batch(parsed.documents) if parsed.documents else []
    ids, lengths = _with_separators(documents, dtype, bos=separator in ("bos", "both"),
                                    eos=separator in ("eos", "both"))
    return Encoded(ids, lengths, parsed.rows, dict(parsed.skipped))


class UnitEncoder:
    """Ray Data UDF: a batch of units (see `tasks.data.units.Unit`) -> their parts, as Arrow tables."""

    def __init__(self, tokenizer, params, part_ids: int = PART_IDS, chunk_bytes: int = sources.CHUNK_BYTES):
        """`part_ids`, `chunk_bytes`: the driver's sizes, so every worker cuts parts and chunks as the driver
        was configured to (tests make them tiny to get many of each)."""
        os.environ["RAYON_NUM_THREADS"] = "1"      # read when the tokenizer's thread pool first starts
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        sources.CHUNK_BYTES = chunk_bytes
        self.part_ids = part_ids
        self.tokenizer, self.params = tokenizer, params
        self.dtype = np.dtype(np.uint16 if tokenizer.vocab_size < 65536 else np.uint32)
        self.sources = {source.name: source for source in params.data.sources}

    def __call__(self, batch: dict) -> Iterator:
        for index, name, uri in zip(batch["index"], batch["source"], batch["uri"]):
            yield from self.encode_unit(int(index), self.sources[str(name)], str(uri))

    def encode_unit(self, index: int, source, uri: str) -> Iterator:
        sent = (0, 0)  # (chunks whose ids went out, parts sent): a retry re-reads but resends nothing
        for attempt in range(1, READ_ATTEMPTS + 1):
            reader = SourceReader(source, self.params, inputs=[uri])
            resume_from = sent
            try:
                for sent, table in self._parts(index, reader, source, uri, *resume_from):  # noqa: B007 (read below)
                    yield table
                return
            except UserError as exc:
                yield _part_table(index, sent[1], error=str(exc))
                return
            except read_errors() as exc:
                if not is_transient(exc):
                    yield _part_table(index, sent[1], error=str(_unreadable(source, uri, exc)))
                    return
                if attempt == READ_ATTEMPTS:
                    raise RuntimeError(f"{uri}: still failing after {attempt} attempts: {exc}") from exc
                wait = BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)]
                log.warning("prepare: %s: attempt %d of %d failed (%s: %s); retrying in %.1fs", uri, attempt,
                            READ_ATTEMPTS, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", wait)
                time.sleep(wait)

    def _parts(self, index: int, reader: SourceReader, source, uri: str, skip: int, part: int) -> Iterator:
        """((chunks covered, parts sent), part table) per part; the first `skip` chunks are read
        but not tokenized (they went out before a retry)."""
        pending: list[Encoded] = []
        size = 0
        chunks = 0
        for chunk in reader.input_chunks(uri):
            chunks += 1
            if chunks <= skip:
                continue
            encoded = encode_chunk(self.tokenizer, source, self.params.data.separator, self.dtype, chunk)
            pending.append(encoded)
            size += len(encoded.ids)
            if size >= self.part_ids:
                yield (chunks, part + 1), _part_table(index, part, pending)
                pending, size, part = [], 0, part + 1
        yield (chunks, part + 1), _part_table(index, part, pending, sha256=reader.input_sha256[uri])


def _part_table(index: int, part: int, encoded: list[Encoded] = (), sha256: str = "", error: str = ""):
    """One row: a part of unit `index` (ids and lengths as raw bytes), its last with the input's sha256."""
    import pyarrow as pa

    skipped: dict = {}
    for item in encoded:
        for reason, count in item.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    ids = b"".join(item.ids.tobytes() for item in encoded)
    lengths = b"".join(item.lengths.astype(np.int64).tobytes() for item in encoded)
    return pa.table({"index": pa.array([index], pa.int64()), "part": pa.array([part], pa.int64()),
                     "ids": pa.array([ids], pa.large_binary()), "lengths": pa.array([lengths], pa.large_binary()),
                     "rows": pa.array([sum(item.rows for item in encoded)], pa.int64()),
                     "skipped": [json.dumps(skipped)], "sha256": [sha256], "done": [bool(sha256 or error)],
                     "error": [error]})


def _with_separators(documents: list[list[int]], dtype, bos: bool, eos: bool) -> tuple[np.ndarray, np.ndarray]:
    """(all ids back to back with BOS/EOS around each document, ids per document). The separators
    go in with array writes instead of a list copy per document."""
    bodies = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    lengths = bodies + bos + eos
    ids = np.empty(int(lengths.sum()), dtype=dtype)
    starts = np.cumsum(lengths) - lengths
    is_body = np.ones(len(ids), dtype=bool)
    if bos:
        ids[starts], is_body[starts] = BOS_ID, False
    if eos:
        ids[starts + lengths - 1], is_body[starts + lengths - 1] = EOS_ID, False
    ids[is_body] = np.fromiter(itertools.chain.from_iterable(documents), dtype=dtype, count=int(bodies.sum()))
    return ids, lengths
