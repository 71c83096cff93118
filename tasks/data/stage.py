"""`tinyllama prepare`: tokenize every source and pack it into Parquet shards + manifest.json.

Layout and fields: docs/CONTRACTS.md "Prepared data". Each source keeps its own shards, so
the mixing weights stay a training-time choice and changing the mix never re-tokenizes.

Everything is built in a staging dir next to the outputs (`{paths.data}/.prepare.tmp`) and
renamed into place at the very end, manifest last: an interrupted or failed run leaves
nothing a later run (or DVC) would trust, and the next run starts the staging dir afresh.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from model.atomic import replace_dir
from tasks.data.sources import BAD_REASONS, SKIP_REASONS, SourceReader, builtin_corpus, where
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
    from tasks.data.encoding import EncoderPool
    from tasks.data.shards import token_dtype

    layout = Layout.from_params(params)
    tokenizer = load_tokenizer(params)
    readers = [SourceReader(source, params) for source in params.data.sources]
    dtype = token_dtype(tokenizer.vocab_size)
    staging = layout.staging_dir
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "prepared").mkdir(parents=True)
    try:
        manifest = {"version": MANIFEST_VERSION, "seq_len": params.data.seq_len, "row_len": params.data.seq_len + 1,
                    "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "separator": params.data.separator,
                    "tokenizer_sha256": tokenizer.sha256, "sources": {}}
        with EncoderPool(str(layout.tokenizer_dir), params.data.encode_processes,
                         params.data.separator, dtype) as pool:
            for reader in readers:
                manifest["sources"][reader.source.name] = _prepare_source(
                    reader, pool, staging / "prepared", params, dtype)
        _write_eval_items(params, staging / "eval")
        write_json_atomic(staging / "prepared" / MANIFEST_FILE, manifest)
        replace_dir(staging / "eval", layout.eval_items_dir)
        replace_dir(staging / "prepared", layout.prepared_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _prepare_source(reader: SourceReader, pool, out_root: Path, params: Params, dtype) -> dict:
    from tasks.data.packing import Packer, is_val
    from tasks.data.shards import ShardWriter

    source, data = reader.source, params.data
    row_len = data.seq_len + 1
    store = Layout.from_params(params).shard_store
    publish = _shared_store_publisher(store) if store else None
    writers = {split: ShardWriter(out_root, f"{source.name}/{split}", row_len, dtype,
                                  data.rows_per_shard, data.row_group_rows, publish) for split in SPLITS}
    packers = {split: Packer(row_len, dtype) for split in SPLITS}
    documents, skipped, rows_read, ids_seen = Counter(), Counter(), 0, 0
    started = time.perf_counter()
    with progress(reader.total_bytes, f"prepare {source.name}", unit="B") as bar:
        for encoded in pool.encode(source, reader.chunks()):
            start = documents["train"] + documents["val"]
            val_docs = is_val(np.arange(start, start + len(encoded.lengths), dtype=np.uint64), data.val_fraction)
            val_ids = np.repeat(val_docs, encoded.lengths)
            for split, doc_mask, id_mask in (("train", ~val_docs, ~val_ids), ("val", val_docs, val_ids)):
                writers[split].write(packers[split].add(encoded.ids[id_mask]))
                documents[split] += int(doc_mask.sum())
            rows_read += encoded.rows
            ids_seen += len(encoded.ids)
            skipped.update(encoded.skipped)
            bar.update(encoded.nbytes)
            bar.set_postfix(docs=documents.total(), tok_s=f"{ids_seen / max(time.perf_counter() - started, 1e-9):,.0f}",
                            refresh=False)
    for writer in writers.values():
        writer.close()
    if store:  # every shard went to the store: leave no empty dirs beside the manifest
        shutil.rmtree(out_root / source.name, ignore_errors=True)
    _check_rows(source, reader, rows_read, skipped, documents, data.max_bad_fraction)
    if writers["train"].rows == 0:
        raise UserError(f"{where(source)}: {packers['train'].dropped} training tokens is less than one row "
                        f"(data.seq_len + 1 = {row_len})")
    if writers["val"].rows == 0:
        print(f"warning: {where(source)}: no validation row (data.val_fraction {data.val_fraction} "
              f"gave {documents['val']} documents)")
    return {
        "format": source.format,
        "inputs": {uri: reader.input_sha256[uri] for uri in reader.inputs},
        "input_rows": rows_read,
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


def _check_rows(source, reader: SourceReader, rows: int, skipped: Counter, documents: Counter,
                max_bad_fraction: float) -> None:
    """Broken rows are skipped and counted; too many of them means the source itself is wrong."""
    bad = sum(skipped[reason] for reason in BAD_REASONS)
    if rows and bad / rows > max_bad_fraction:
        reasons = ", ".join(f"{reason} {skipped[reason]}" for reason in BAD_REASONS if skipped[reason])
        raise UserError(f"{where(source)}: {bad} of {rows} rows are bad ({reasons}), more than "
                        f"data.max_bad_fraction={max_bad_fraction} in {source.uri or reader.inputs[0]}")
    if not documents.total():
        raise UserError(f"{where(source)}: no documents in {source.uri or reader.inputs[0]} "
                        f"({rows} rows read, skipped: {dict(+skipped) or 'none'})")


def _write_eval_items(params: Params, out_dir: Path) -> None:
    """The embedded corpus's held-out items; without a builtin source an empty task list, so the
    output always exists (a DVC out) and never holds items of a corpus no longer trained on."""
    if any(source.format == "builtin" for source in params.data.sources):
        from tasks.data.corpus import write_eval_items

        write_eval_items(builtin_corpus(params), out_dir)
    else:
        out_dir.mkdir()
        write_json_atomic(out_dir / EVAL_TASKS_FILE, {})
