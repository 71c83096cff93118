"""Parse + tokenize chunks in a process pool, handing results back in input order.

The parent only reads raw bytes and packs; each worker loads the tokenizer once and turns a
chunk into one flat id array plus per-document lengths (separators included), which is cheap
to send back. At most `IN_FLIGHT_PER_WORKER × workers` chunks are in flight, so memory stays
flat however fast the reader is, and results come back in submission order, so the output does
not depend on the worker count or on which worker finishes first.

Like any forkserver/spawn pool, it re-imports the caller's main module in the server: a script
that calls `prepare()` with `data.workers > 1` needs an `if __name__ == "__main__":` guard (the
`tinyllama` CLI and pytest have one).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from model.tokenizer import BOS_ID, EOS_ID
from tasks.data.sources import Chunk, parse_chunk

IN_FLIGHT_PER_WORKER = 4
"""Chunks queued per worker: enough that a worker never waits while the parent, which reads
and writes between results, is briefly off the CPU; few enough to keep memory flat."""

_tokenizer = None


@dataclass
class Encoded:
    ids: np.ndarray            # every document's ids, separators included, back to back
    lengths: np.ndarray        # ids per document (int64), in order
    rows: int                  # input rows the chunk held
    skipped: dict              # reason -> rows skipped
    nbytes: int                # input bytes the chunk stood for (progress)


def _load_tokenizer(tokenizer_dir: str) -> None:
    global _tokenizer
    from model.tokenizer import Tokenizer

    _tokenizer = Tokenizer.load(tokenizer_dir)


def _init_worker(tokenizer_dir: str, owner: int) -> None:
    """Pool initializer: one tokenizer per process, single-threaded, because the pool already
    uses every core the user gave it (`data.encode_processes`)."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threading.Thread(target=_exit_with_owner, args=(owner,), daemon=True).start()
    _load_tokenizer(tokenizer_dir)


def _exit_with_owner(owner: int) -> None:
    """A killed stage (SIGKILL, OOM) never shuts its pool down; its workers would wait on the
    task queue forever and, holding the forkserver's liveness pipe, keep that alive too. So
    each worker leaves as soon as the process that owns the pool is gone."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(1)


def encode_chunk(task: tuple) -> Encoded:
    """Parse and tokenize one chunk; the separator policy puts BOS before each document (as
    TinyLlama's real run did, see its issue #40), EOS after it, or both."""
    source, separator, dtype, chunk = task
    parsed = parse_chunk(source, chunk)
    documents = _tokenizer.encode_batch(parsed.documents) if parsed.documents else []
    ids, lengths = _with_separators(documents, dtype, bos=separator in ("bos", "both"),
                                    eos=separator in ("eos", "both"))
    return Encoded(ids, lengths, parsed.rows, dict(parsed.skipped), chunk.nbytes)


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


_PRELOAD = ["tasks.data.encoding", "model.tokenizer", "tokenizers", "sentencepiece.sentencepiece_model_pb2"]


def _worker_context():
    """Workers fork from a fresh single-threaded server that imported the heavy modules once.

    Not plain `fork`: the parent may hold threads (the progress bar's monitor, s3fs's event
    loop, a tokenizer thread pool) whose locks a forked child would inherit mid-use. Not `spawn`:
    every worker would start an interpreter and import numpy and the tokenizers itself (measured
    for the whole stage, 2 workers, a 140K-token corpus: spawn ~2.6 s of CPU, forkserver ~1.9 s,
    in-process ~1.1 s), a cost that grows with `data.encode_processes`.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


class EncoderPool:
    """`encode(source, chunks)` over `workers` processes (in-process when `workers == 1`)."""

    def __init__(self, tokenizer_dir: str, workers: int, separator: str, dtype: np.dtype):
        self.workers, self.separator, self.dtype = workers, separator, dtype
        self._executor = None
        if workers == 1:
            _load_tokenizer(tokenizer_dir)
        else:
            self._executor = ProcessPoolExecutor(workers, mp_context=_worker_context(),
                                                 initializer=_init_worker, initargs=(tokenizer_dir, os.getpid()))

    def encode(self, source, chunks: Iterable[Chunk]) -> Iterator[Encoded]:
        tasks = ((source, self.separator, self.dtype, chunk) for chunk in chunks)
        if self._executor is None:
            yield from map(encode_chunk, tasks)
            return
        in_flight: deque = deque()
        for task in tasks:
            in_flight.append(self._executor.submit(encode_chunk, task))
            if len(in_flight) >= IN_FLIGHT_PER_WORKER * self.workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
