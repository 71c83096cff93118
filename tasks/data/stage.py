"""`tinyllama prepare`: tokenize every source and pack it into Parquet shards + manifest.json.

Layout and fields: docs/CONTRACTS.md "Prepared data". Each source keeps its own shards, so
the mixing weights stay a training-time choice and changing the mix never re-tokenizes.

Two phases. Phase 1, the expensive one, tokenizes every input file (a unit) on Ray Data, in
parallel, into a sealed token file (tasks/data/tokenize_units.py, tasks/data/units.py). Phase 2
packs the sealed units in one fixed order (sources as listed, inputs sorted) into the shards with
the same `Packer`/`ShardWriter` as always: rows are windows over a source's whole token stream and
the val split hashes the source-wide document index, so the bytes do not depend on how many
workers tokenized or in which order they finished.

Everything is built in a staging dir next to the outputs (`{paths.data}/.prepare.tmp`) and
renamed into place at the very end, manifest last (what DVC tracks). Sealed units survive an
interrupted or failed run, and the next run tokenizes only the inputs not sealed yet; the shards
and eval items are always built afresh. The staging dir goes once the outputs are in place.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from model.atomic import replace_dir
from tasks.data.sources import BAD_REASONS, SKIP_REASONS, SourceReader, builtin_corpus, where
from tasks.data.tokenize_units import tokenize_units
from tasks.data.units import Sealed, Unit, load_sealed, open_unit, unit_key
from tasks.errors import UserError
from tasks.files import write_json_atomic
from tasks.layout import EVAL_TASKS_FILE, MANIFEST_FILE, Layout, join
from tasks.logs import progress
from tasks.params import Params, add_params_argument, load_params

MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def add_arguments(parser) -> None:
    add_params_argument(parser)


def main(args) -> int:
    from tasks.logs import stage_log

    params = load_params(args.params)
    with stage_log("prepare", params):
        _prepare_and_report(params)
    return 0


def _prepare_and_report(params: Params) -> None:
    started = time.perf_counter()
    manifest = prepare(params)
    elapsed = time.perf_counter() - started
    total = sum(split["tokens"] for s in manifest["sources"].values() for split in s["splits"].values())
    for name, source in manifest["sources"].items():
        splits = source["splits"]
        skipped = ", ".join(f"{k} {v}" for k, v in source["skipped"].items() if v) or "none"
        print(f"{name}: train {splits['train']['rows']} rows / {splits['train']['tokens']} tokens, "
              f"val {splits['val']['rows']} rows / {splits['val']['tokens']} tokens; skipped: {skipped}")
    print(f"prepared {total} tokens in {elapsed:.1f}s ({total / max(elapsed, 1e-9):,.0f} tokens/s) "
          f"-> {Layout.from_params(params).prepared_dir}")


def load_tokenizer(params: Params):
    from model.tokenizer import Tokenizer

    directory = Layout.from_params(params).tokenizer_dir
    try:
        return Tokenizer.load(str(directory))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"paths.models: no usable tokenizer at {directory} ({exc}); "
                        f"run `tinyllama tokenizer` first") from None


def prepare(params: Params) -> dict:
    """Run the stage; returns the manifest it wrote. Raises `UserError` before publishing
    anything if a source is missing, unreadable or has too many bad rows."""
    from tasks.data.shards import token_dtype
    from tasks.ray_cluster import ray_session, usable_cpus

    layout = Layout.from_params(params)
    tokenizer = load_tokenizer(params)
    readers = [SourceReader(source, params) for source in params.data.sources]
    dtype = token_dtype(tokenizer.vocab_size)
    units = plan_units(readers, params, tokenizer, dtype)
    staging = layout.staging_dir
    for name in ("prepared", "eval"):
        shutil.rmtree(staging / name, ignore_errors=True)
    sealed = _sealed_units(units, staging, dtype)
    todo = [unit for unit in units if unit.index not in sealed]
    if todo:
        # on the stage's own Ray, one logical CPU slot per worker even past the cores (a cluster has its own)
        extra = max(0, params.data.encode_processes - usable_cpus())
        with ray_session(params, "prepare", extra_cpus=extra, dashboard=False):
            _check_workers(params)
            todo_bytes = sum(_reader(readers, unit).sizes[unit.uri] for unit in todo)
            with progress(todo_bytes, "prepare: tokenize", unit="B") as bar:
                def on_sealed(unit: Unit, record: Sealed) -> None:
                    sealed[unit.index] = record
                    bar.update(_reader(readers, unit).sizes[unit.uri])

                with _driver_time("tokenized", lambda: sum(sealed[unit.index].ids for unit in todo)):
                    tokenize_units(todo, params, tokenizer, lambda unit: _units_dir(staging, unit), dtype,
                                   on_sealed)
    try:
        with _driver_time("packed", lambda: sum(record.ids for record in sealed.values())):
            manifest = _pack(readers, units, sealed, staging, params, tokenizer, dtype)
    except BaseException:
        for name in ("prepared", "eval"):
            shutil.rmtree(staging / name, ignore_errors=True)
        raise
    replace_dir(staging / "eval", layout.eval_items_dir)
    replace_dir(staging / "prepared", layout.prepared_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _pack(readers, units: list[Unit], sealed: dict[int, Sealed], staging: Path, params: Params, tokenizer,
          dtype) -> dict:
    """Phase 2 for every source, then the eval items and the manifest, all in the staging dir."""
    (staging / "prepared").mkdir(parents=True)
    manifest = {"version": MANIFEST_VERSION, "seq_len": params.data.seq_len, "row_len": params.data.seq_len + 1,
                "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "separator": params.data.separator,
                "tokenizer_sha256": tokenizer.sha256, "sources": {}}
    for reader in readers:
        mine = [unit for unit in units if unit.source == reader.source.name]
        _check_rows(reader.source, reader, [sealed[unit.index] for unit in mine], params.data.max_bad_fraction)
    for reader in readers:
        mine = [unit for unit in units if unit.source == reader.source.name]
        manifest["sources"][reader.source.name] = _pack_source(
            reader, [(unit, sealed[unit.index]) for unit in mine], staging, params, dtype)
    _write_eval_items(params, staging / "eval")
    write_json_atomic(staging / "prepared" / MANIFEST_FILE, manifest)
    return manifest


@contextmanager
def _driver_time(done: str, tokens: Callable[[], int]):
    """Prints a phase's wall time and this process's CPU time per token once it is done: the driver
    receives and seals every token (phase 1) and packs every token (phase 2) in one process, whatever
    the workers, so at a terabyte its rates bound the stage (`data.seal_tokens_per_second`,
    `data.pack_tokens_per_second`)."""
    started, cpu = time.perf_counter(), time.process_time()
    yield
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    count = tokens()
    print(f"prepare: {done} {count:,} tokens in {wall:.1f}s; the driver used {cpu:.1f} CPU-s "
          f"({count / max(cpu, 1e-9):,.0f} tokens per driver CPU-second)")


def plan_units(readers: list[SourceReader], params: Params, tokenizer, dtype) -> list[Unit]:
    """Every input of every source, in the one order the shards are packed in, each keyed by what
    decides its tokens (so a sealed unit of other input or settings is never reused)."""
    units = []
    for reader in readers:
        source = reader.source
        settings = {"source": source.model_dump(mode="json", exclude={"name", "uri", "weight", "languages"}),
                    "builtin": params.data.builtin.model_dump(mode="json") if source.format == "builtin" else None,
                    "tokenizer": tokenizer.sha256, "separator": params.data.separator, "dtype": np.dtype(dtype).name}
        for uri in reader.inputs:
            units.append(Unit(len(units), source.name, uri, unit_key(uri, reader.stamps[uri], settings)))
    return units


def _units_dir(staging: Path, unit: Unit) -> Path:
    return staging / "units" / unit.source


def _reader(readers: list[SourceReader], unit: Unit) -> SourceReader:
    return next(reader for reader in readers if reader.source.name == unit.source)


def _sealed_units(units: list[Unit], staging: Path, dtype) -> dict[int, Sealed]:
    """The units an earlier, interrupted run sealed and whose files still match their seal."""
    sealed = {}
    for unit in units:
        record = load_sealed(_units_dir(staging, unit), unit, dtype)
        if record is not None:
            sealed[unit.index] = record
    if sealed:
        print(f"prepare: {len(sealed)} of {len(units)} inputs already tokenized by an earlier run; kept")
    return sealed


def _check_workers(params: Params) -> None:
    """On the stage's own Ray the pool must fit what it has (Ray would wait forever); a cluster at
    RAY_ADDRESS may still be scaling up its CPU workers, so there it is not checked."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return
    data, have = params.data, ray.cluster_resources()
    if data.encode_processes > have.get("CPU", 0):
        raise UserError(f"data.encode_processes: {data.encode_processes} tokenizer workers, but this "
                        f"machine's Ray has {have.get('CPU', 0):g} CPUs")
    for name, amount in data.resources_per_worker.items():
        if amount * data.encode_processes > have.get(name, 0):
            raise UserError(f"data.resources_per_worker: {data.encode_processes} workers × {name} {amount:g}, "
                            f"but this machine's Ray has {have.get(name, 0):g} {name} (set RAY_ADDRESS for a cluster)")


PACK_DOCUMENTS = 1 << 16
"""Documents packed at a time: phase 2 holds one such block of a unit in memory, never a whole file."""


def _pack_source(reader: SourceReader, units: list[tuple[Unit, Sealed]], staging: Path, params: Params,
                 dtype) -> dict:
    """Phase 2: a source's sealed units, in input order, into today's shards (no tokenizing)."""
    from tasks.data.packing import Packer, is_val
    from tasks.data.shards import ShardWriter

    source, data, out_root = reader.source, params.data, staging / "prepared"
    row_len = data.seq_len + 1
    store = Layout.from_params(params).shard_store
    publish = _shared_store_publisher(store) if store else None
    writers = {split: ShardWriter(out_root, f"{source.name}/{split}", row_len, dtype,
                                  data.rows_per_shard, data.row_group_rows, publish) for split in SPLITS}
    packers = {split: Packer(row_len, dtype) for split in SPLITS}
    documents, skipped = Counter(), Counter()
    for unit, sealed in units:
        tokens = open_unit(_units_dir(staging, unit), unit, sealed, dtype)
        ends = np.cumsum(tokens.lengths)
        for first in range(0, len(tokens.lengths), PACK_DOCUMENTS):
            lengths = np.asarray(tokens.lengths[first:first + PACK_DOCUMENTS])
            start_id = int(ends[first - 1]) if first else 0
            ids = np.asarray(tokens.ids[start_id:start_id + int(lengths.sum())])
            start = documents["train"] + documents["val"]
            val_docs = is_val(np.arange(start, start + len(lengths), dtype=np.uint64), data.val_fraction)
            val_ids = np.repeat(val_docs, lengths)
            for split, doc_mask, id_mask in (("train", ~val_docs, ~val_ids), ("val", val_docs, val_ids)):
                writers[split].write(packers[split].add(ids[id_mask]))
                documents[split] += int(doc_mask.sum())
        skipped.update(sealed.skipped)
        del tokens
    for writer in writers.values():
        writer.close()
    if store:  # every shard went to the store: leave no empty dirs beside the manifest
        shutil.rmtree(out_root / source.name, ignore_errors=True)
    if not documents.total():
        raise UserError(f"{where(source)}: no documents in {source.uri or reader.inputs[0]} "
                        f"({sum(s.rows for _, s in units)} rows read, skipped: {dict(+skipped) or 'none'})")
    if writers["train"].rows == 0:
        raise UserError(f"{where(source)}: {packers['train'].dropped} training tokens is less than one row "
                        f"(data.seq_len + 1 = {row_len})")
    if writers["val"].rows == 0:
        print(f"warning: {where(source)}: no validation row (data.val_fraction {data.val_fraction} "
              f"gave {documents['val']} documents)")
    return {
        "format": source.format,
        "inputs": {unit.uri: sealed.input_sha256 for unit, sealed in units},
        "input_rows": sum(sealed.rows for _, sealed in units),
        "splits": {split: {"rows": writers[split].rows, "tokens": writers[split].rows * row_len,
                           "documents": documents[split], "dropped_tokens": packers[split].dropped,
                           "shards": writers[split].shards, "shard_sha256": writers[split].sha256}
                   for split in SPLITS},
        "skipped": {reason: skipped[reason] for reason in SKIP_REASONS},
    }


def _shared_store_publisher(store: str):
    """Shards to a store every node reaches, named by content (`<sha256>.parquet`): written once (an
    identical shard is already there), never overwritten, so any manifest that names one stays valid; the
    local file goes as soon as it is uploaded. The manifest records the URI."""
    from tasks.files import exists, upload

    def publish(local: Path, sha256: str) -> str:
        name = f"{sha256}.parquet"
        if not exists(join(store, name)):
            staged = local.with_name(name)
            local.rename(staged)
            upload(staged.parent, store, [name])
            local = staged
        local.unlink()
        return join(store, name)

    return publish


def _check_rows(source, reader: SourceReader, units: list[Sealed], max_bad_fraction: float) -> None:
    """Broken rows are skipped and counted; too many of them means the source itself is wrong. Only
    malformed data counts here: a storage fault was retried (or failed the stage) long before."""
    rows = sum(unit.rows for unit in units)
    skipped = Counter()
    for unit in units:
        skipped.update(unit.skipped)
    bad = sum(skipped[reason] for reason in BAD_REASONS)
    if rows and bad / rows > max_bad_fraction:
        reasons = ", ".join(f"{reason} {skipped[reason]}" for reason in BAD_REASONS if skipped[reason])
        raise UserError(f"{where(source)}: {bad} of {rows} rows are bad ({reasons}), more than "
                        f"data.max_bad_fraction={max_bad_fraction} in {source.uri or reader.inputs[0]}")


def _write_eval_items(params: Params, out_dir: Path) -> None:
    """The embedded corpus's held-out items; without a builtin source an empty task list, so the
    output always exists (a DVC out) and never holds items of a corpus no longer trained on."""
    if any(source.format == "builtin" for source in params.data.sources):
        from tasks.data.corpus import write_eval_items

        write_eval_items(builtin_corpus(params), out_dir)
    else:
        out_dir.mkdir()
        write_json_atomic(out_dir / EVAL_TASKS_FILE, {})
