"""Chat data sources → examples, with every skipped row counted by reason.

Files are found and opened by prepare's readers (`tasks.data.sources`: files, globs, directories,
`s3://`, `hf://`, `.gz`/`.zst`), so a chat source takes the same `uri`s a corpus does. Rows come
from JSON lines, a JSON array (Alpaca's own files) or Parquet (how the Hub stores UltraChat-200k
and UltraFeedback-binarized); `formats.py` turns each row into an example.

A source that cannot be read at all, or yields no example from its rows, is a `UserError` naming
its field; otherwise bad rows are skipped and counted, and `check_bad_fraction` fails the stage
before training when a source has more of them than `sft.max_bad_fraction` allows.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from tasks.data.sources import list_inputs, open_input, read_errors
from tasks.errors import UserError
from tasks.files import sha256_file
from tasks.params import ChatSourceParams, Params
from tasks.sft.formats import PARSERS, BadRow

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".parquet")
GOOD = "ok"


@dataclass
class SourceRead:
    """What a source gave: its examples (conversations or `Preference`s), its input hashes, and
    the row counts (`rows` read, `skipped` by reason)."""

    name: str
    examples: list = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def bad(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> dict:
        return {"inputs": self.inputs, "rows": self.rows, "examples": len(self.examples),
                "skipped": dict(sorted(self.skipped.items()))}


def _json_rows(stream, uri: str) -> Iterator:
    """A `.json` file: a JSON array of rows (Alpaca's layout) or one JSON object per line."""
    data = stream.read()
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        yield from _jsonl_rows(data.splitlines())
        return
    if not isinstance(parsed, list):
        raise UserError(f"{uri}: a .json source must hold an array of rows, got {type(parsed).__name__}")
    yield from parsed


def _jsonl_rows(lines) -> Iterator:
    import orjson

    for line in lines:
        if not line.strip():
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                yield BadRow("row: not UTF-8", "non_utf8")
                continue
            yield BadRow("row: not valid JSON", "malformed_json")


def _parquet_rows(uri: str) -> Iterator:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=256):
            yield from batch.to_pylist()


def file_rows(uri: str, inputs: dict[str, str]) -> Iterator:
    """Rows of one file (a `BadRow` in place of a line that is not JSON); records its sha256 in `inputs`."""
    name = uri.removesuffix(".gz").removesuffix(".zst")
    if name.endswith(".parquet"):
        yield from _parquet_rows(uri)
        inputs[uri] = sha256_file(uri)
        return
    with open_input(uri) as (stream, hashing):
        yield from (_json_rows(stream, uri) if name.endswith(".json") else _jsonl_rows(stream))
        inputs[uri] = hashing.drain()


def read_source(source: ChatSourceParams, field_name: str, params: Params, preference: bool = False) -> SourceRead:
    """Every example of one source, in file order (`limit`: the first rows only): conversations, or
    `Preference`s when `preference` (a `builtin` source gives either)."""
    if source.format == "builtin":
        from tasks.sft.world_chat import builtin_source

        return builtin_source(source, preference, params)
    read = SourceRead(source.name)
    parse = PARSERS[source.format]
    for uri in list_inputs(source.uri, f"{field_name}.uri", SUFFIXES):
        try:
            for row in file_rows(uri, read.inputs):
                if source.limit is not None and read.rows >= source.limit:
                    break
                read.rows += 1
                try:
                    if isinstance(row, BadRow):
                        raise row
                    read.examples.append(parse(row))
                except BadRow as exc:
                    read.skipped[exc.reason] += 1
            if uri not in read.inputs:  # stopped early at `limit`: still identify the file
                read.inputs[uri] = sha256_file(uri)
        except read_errors() as exc:
            message = f"{field_name}.uri: cannot read {uri}: {type(exc).__name__}: {exc}"
            raise UserError(message.splitlines()[0]) from None
        if source.limit is not None and read.rows >= source.limit:
            break
    if not read.rows:
        raise UserError(f"{field_name}.uri: {source.uri!r} holds no rows")
    if not read.examples:
        reason, count = read.skipped.most_common(1)[0]
        raise UserError(f"{field_name}.format: no row of {source.uri!r} is a {source.format!r} example "
                        f"({count} of {read.rows} rows: {reason})")
    return read


def check_bad_fraction(read: SourceRead, field_name: str, max_bad_fraction: float) -> None:
    fraction = read.bad / read.rows
    if fraction > max_bad_fraction:
        reasons = ", ".join(f"{reason} {n}" for reason, n in read.skipped.most_common())
        raise UserError(f"{field_name}: {read.bad} of {read.rows} rows are bad ({fraction:.1%} > "
                        f"sft.max_bad_fraction {max_bad_fraction:.1%}): {reasons}")
