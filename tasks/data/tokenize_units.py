"""Phase 1 of `prepare` on the driver: run `UnitEncoder` over the unsealed units on Ray Data and seal them.

One Ray Data `map_batches` over a dataset of units (one unit per block, one per batch), with a fixed
pool of `data.encode_processes` actors, one CPU each, on the stage's local Ray or the cluster at
`RAY_ADDRESS`. Output order is preserved, so the parts of each unit arrive in order and are appended
to its files by the driver, the only process that writes the staging dir (a worker on another node
cannot see it). A part already seen (Ray re-ran a dead worker's task) is dropped; a run that dies
anyway (driver killed, a node lost for good) leaves every unit sealed so far for the next run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tasks.data.units import Sealed, Unit, UnitWriter
from tasks.errors import UserError

RUN_ATTEMPTS = 4
RETRY_WAIT_S = 3
"""Whole-dataset runs before giving up, and the wait before each rerun (3 s, 6 s, 9 s): a run fails when Ray
could not recover a task itself, e.g. a tokenizer actor killed (Ray Data then fails the dataset)."""
log = logging.getLogger(__name__)


def tokenize_units(units: list[Unit], params, tokenizer, directory: Callable[[Unit], Path], dtype: np.dtype,
                   on_sealed: Callable[[Unit, Sealed], None]) -> None:
    """Seal every unit of `units` (each under `directory(unit)`), calling `on_sealed` as each is done."""
    import ray

    todo = list(units)
    for attempt in range(1, RUN_ATTEMPTS + 1):
        try:
            _run(todo, params, tokenizer, directory, dtype, on_sealed)
            return
        except ray.exceptions.RayError as exc:
            done = {unit.index for unit in todo if (directory(unit) / f"{unit.key}.json").exists()}
            todo = [unit for unit in todo if unit.index not in done]
            if attempt == RUN_ATTEMPTS or not todo:
                raise
            log.warning("prepare: tokenizing failed (%s); again in %ds for the %d units not sealed yet",
                        str(exc).splitlines()[0], RETRY_WAIT_S * attempt, len(todo))
            time.sleep(RETRY_WAIT_S * attempt)  # lets Ray tear the failed run's actors down first


def _run(units: list[Unit], params, tokenizer, directory, dtype, on_sealed) -> None:
    import ray.data

    from tasks.data import encoding, sources
    from tasks.logs import adopt_library_logging

    adopt_library_logging("ray.data")  # its execution lines and warnings into the stage's log, not the console
    if not units:
        return
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    by_index = {unit.index: unit for unit in units}
    dataset = ray.data.from_items([asdict(unit) for unit in units], override_num_blocks=len(units))
    size = min(params.data.encode_processes, len(units))
    # a cluster's CPU group scales up while the pool starts: begin with what is there, grow to `size`
    # (a fixed pool larger than the nodes that come up would wait forever); the stage's own Ray has them all
    pool = (ray.data.ActorPoolStrategy(min_size=1, max_size=size) if os.environ.get("RAY_ADDRESS")
            else ray.data.ActorPoolStrategy(size=size))
    parts = dataset.map_batches(encoding.UnitEncoder, batch_size=1, compute=pool, num_cpus=1,
                                resources=dict(params.data.resources_per_worker) or None, batch_format="numpy",
                                fn_constructor_args=(tokenizer, params, encoding.PART_IDS,
                                                     sources.CHUNK_BYTES))
    writers: dict[int, UnitWriter] = {}
    try:
        for batch in parts.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                unit = by_index[row["index"]]
                if row["error"]:
                    raise UserError(row["error"])
                writer = writers.get(unit.index) or writers.setdefault(
                    unit.index, UnitWriter(directory(unit), unit.key, dtype))
                if row["part"] < writer.parts:
                    continue  # re-sent by a task Ray retried: the same bytes, already written
                if row["part"] > writer.parts:
                    raise RuntimeError(f"{unit.uri}: part {row['part']} arrived before part {writer.parts}")
                writer.append(row["ids"], row["lengths"], row["rows"], json.loads(row["skipped"]))
                if row["done"]:
                    on_sealed(unit, writer.seal(unit.uri, row["sha256"]))
                    del writers[unit.index]
    finally:
        for writer in writers.values():
            writer.discard()
