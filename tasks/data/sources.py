"""Readers for every corpus format that `prepare` and the tokenizer trainer consume.

Reading is cut in two so that `prepare` can spread the expensive half over a process pool and
still produce the same bytes for any worker count:

- `SourceReader` runs in the parent. It lists the inputs in one fixed (sorted) order, streams
  and decompresses them (local paths, globs, directories or `s3://` through fsspec/s3fs) and
  cuts them into chunks of about `CHUNK_BYTES`, hashing every input as it goes. JSON lines go out
  as one block of whole lines per chunk: the parent never touches a single line, so a pool of
  workers is not held back by one process looping over millions of them.
- `parse_chunk` runs anywhere (a worker): it splits, decodes, parses and filters one chunk's
  records into document strings and counts every row it skips and why.

`iter_documents` chains the two for callers that only want the text (the tokenizer trainer).
Bad input that makes a whole source unusable (missing file, empty glob, unreadable archive,
missing text column) raises `UserError`; bad *rows* are skipped and counted, and `prepare`
decides whether there are too many.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tasks.errors import UserError
from tasks.files import sha256_file

if TYPE_CHECKING:
    from tasks.params import Params, SourceParams

CHUNK_BYTES = 256 * 1024
"""Raw input per chunk: big enough to amortize a worker round trip, small enough that the
chunks in flight (2 per worker) keep memory flat whatever the corpus size."""

SKIP_REASONS = ("malformed_json", "non_utf8", "missing_field", "excluded_set", "empty")
BAD_REASONS = ("malformed_json", "non_utf8", "missing_field")
"""Skips that mean broken data (counted against `data.max_bad_fraction`); an excluded set or an
empty text is the filter working as configured."""

_EXTENSIONS = {
    "slimpajama": (".jsonl", ".jsonl.zst", ".jsonl.gz"),
    "jsonl": (".jsonl", ".jsonl.zst", ".jsonl.gz"),
    "starcoderdata": (".parquet",),
    "text": (".txt", ".txt.zst", ".txt.gz"),
}
_GLOB_CHARS = set("*?[")


@dataclass
class Chunk:
    """A slice of one source's records in input order: raw bytes (JSON lines, text documents)
    or already-decoded strings (Parquet cells, builtin documents)."""

    records: list | bytes    # the records, or JSON lines as one block of whole lines
    nbytes: int = 0          # input bytes consumed since the previous chunk (progress)
    input: str = ""          # the file the records came from (error messages)
    first: bool = False      # the first chunk of its input (where a wrong text field shows)


@dataclass
class Parsed:
    documents: list[str]
    rows: int
    skipped: Counter = field(default_factory=Counter)


def where(source: SourceParams, attribute: str = "") -> str:
    """'data.sources[slimpajama].uri': the params field an error is about."""
    return f"data.sources[{source.name}]" + (f".{attribute}" if attribute else "")


def text_field(source: SourceParams) -> str:
    """The row field holding the document: as configured, else the format's own name for it
    (Starcoderdata keeps code in `content`, SlimPajama and generic JSON lines in `text`)."""
    if source.text_field:
        return source.text_field
    return "content" if source.format == "starcoderdata" else "text"


# ---------------------------------------------------------------- locating inputs


def resolve_inputs(source: SourceParams) -> list[str]:
    """The source's files as full URIs, sorted so every run (and every rank) reads one order.

    `uri` may be a file, a directory (searched recursively for the format's extensions) or a
    glob; `s3://` and other fsspec protocols work the same way as local paths.
    """
    paths = list_inputs(source.uri, where(source, "uri"), _EXTENSIONS[source.format])
    if source.format == "starcoderdata" and source.languages:
        paths = _language_subset(source, paths)
    return paths


def list_inputs(uri: str, field: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files a uri names (a file, a directory searched for `suffixes`, or a glob; local or any
    fsspec protocol), sorted; `UserError`s name `field`."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise UserError(f"{field}: cannot open {uri!r}: {exc}") from None
    try:
        if _GLOB_CHARS & set(path):
            paths = [p for p in fs.glob(path) if fs.isfile(p)]
            if not paths:
                raise UserError(f"{field}: no files match {uri!r}")
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if p.endswith(suffixes)]
            if not paths:
                raise UserError(f"{field}: no {'/'.join(suffixes)} files under {uri!r}")
        elif fs.isfile(path):
            paths = [path]
        else:
            raise UserError(f"{field}: file not found: {uri!r}")
    except (OSError, PermissionError) as exc:
        raise UserError(f"{field}: cannot list {uri!r}: {exc}") from None
    return [_as_given(fs, uri, p) for p in sorted(paths)]


def _as_given(fs, uri: str, path: str) -> str:
    """Local files stay plain paths (relative when the uri was), so the manifest reads the same
    on every checkout; remote ones keep their protocol (`s3://bucket/key`)."""
    import os

    if "file" in fs.protocol:
        return path if os.path.isabs(uri) else os.path.relpath(path)
    return fs.unstrip_protocol(path)


def _language_subset(source: SourceParams, paths: list[str]) -> list[str]:
    """Starcoderdata has one folder per language; keep the folders named in `languages`."""
    wanted = set(source.languages)
    kept = [p for p in paths if p.rstrip("/").split("/")[-2] in wanted]
    found = {p.rstrip("/").split("/")[-2] for p in kept}
    missing = sorted(wanted - found)
    if missing:
        raise UserError(f"{where(source, 'languages')}: no Parquet files for {', '.join(missing)} under {source.uri!r}")
    return kept


# ---------------------------------------------------------------- streaming readers


class _HashingReader(io.RawIOBase):
    """Hashes and counts the (compressed) bytes as the decompressor pulls them: one read pass
    gives both the documents and the input's sha256 for the manifest."""

    def __init__(self, raw):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.sha256.update(data)
        self.consumed += len(data)
        return len(data)

    def drain(self) -> str:
        """Hash whatever the decompressor left unread (trailing frames, padding)."""
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


@contextlib.contextmanager
def open_input(uri: str) -> Iterator[tuple[io.BufferedIOBase, _HashingReader]]:
    """(decompressed stream, hashing reader) of one input: `.zst`/`.gz` by extension, local or any
    fsspec protocol; `hashing.drain()` at the end gives the sha256 of the stored bytes."""
    import fsspec

    with fsspec.open(uri, "rb") as raw:
        hashing = _HashingReader(raw)
        yield _decompressed(uri, hashing), hashing


def _decompressed(uri: str, hashing: _HashingReader):
    if uri.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(hashing, read_across_frames=True),
                                 buffer_size=1 << 20)
    if uri.endswith(".gz"):
        return gzip.GzipFile(fileobj=io.BufferedReader(hashing, buffer_size=1 << 20))
    return io.BufferedReader(hashing, buffer_size=1 << 20)


def _line_blocks(stream) -> Iterator[bytes]:
    """Whole lines, about `CHUNK_BYTES` at a time, each block one bytes object (a line longer
    than that is carried over until it ends)."""
    pending: list[bytes] = []
    while block := stream.read(CHUNK_BYTES):
        cut = block.rfind(b"\n") + 1
        if not cut:
            pending.append(block)
            continue
        yield b"".join([*pending, block[:cut]])
        pending = [block[cut:]]
    if tail := b"".join(pending):
        yield tail


def _batched(records: Iterator) -> Iterator[list]:
    """Records in lists of about `CHUNK_BYTES`."""
    batch, size = [], 0
    for record in records:
        batch.append(record)
        size += len(record)
        if size >= CHUNK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _unreadable(source: SourceParams, uri: str, exc: Exception) -> UserError:
    return UserError(f"{where(source, 'uri')}: cannot read {uri}: {type(exc).__name__}: {exc}".splitlines()[0])


def read_errors() -> tuple[type[Exception], ...]:
    import pyarrow
    import zstandard

    return (OSError, EOFError, zlib.error, zstandard.ZstdError, pyarrow.ArrowException)


@contextlib.contextmanager
def _local_copy(uri: str) -> Iterator[tuple[str, str]]:
    """(a local path of the input, its sha256), reading it once: Parquet needs random access (its
    footer first), so a remote file is streamed to a temporary file while it is hashed, and pyarrow
    then reads row groups from local disk (memory stays one row group, whatever the file size)."""
    import tempfile

    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if "file" in fs.protocol:
        yield path, sha256_file(uri)
        return
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(suffix=".parquet") as local, fs.open(path, "rb") as remote:
        while block := remote.read(1 << 22):
            digest.update(block)
            local.write(block)
        local.flush()
        yield local.name, digest.hexdigest()




_TRANSIENT_NAMES = {"TimeoutError", "ConnectionError", "ConnectionResetError", "ConnectionAbortedError",
                    "BrokenPipeError", "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError",
                    "ConnectionClosedError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
                    "ServerTimeoutError", "IncompleteReadError", "ResponseStreamingError", "ProtocolError"}
_TRANSIENT_WORDS = ("503", "SlowDown", "ServiceUnavailable", "InternalError",
                    "Service Unavailable", "Internal Server Error", "Bad Gateway", "Gateway Timeout", "timed out",
                    "Connection reset", "RequestTimeout")


def is_transient(exc: BaseException) -> bool:
    """A fault of the storage or the network (timeout, 5xx, connection reset), worth retrying, as
    opposed to a file that is missing, forbidden or broken (the user's to fix). Looks through the
    exception's causes: s3fs and aiobotocore wrap the network's errors in their own."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            return False
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
            return True
        if isinstance(exc, OSError) and any(word in str(exc) for word in _TRANSIENT_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class SourceReader:
    """Streams one source as `Chunk`s in a fixed order; fills `input_sha256` as inputs finish."""

    def __init__(self, source: SourceParams, params: Params, inputs: list[str] | None = None):
        """`inputs`: the already listed inputs to read (a `prepare` worker reading one unit), so a
        worker never lists the source again."""
        self.source = source
        self.params = params
        self.input_sha256: dict[str, str] = {}
        self.stamps: dict[str, dict] = {}
        if source.format == "builtin":
            self.inputs = [_builtin_uri(source, params)]
            self.sizes = {self.inputs[0]: sum(len(d.encode()) for d in _builtin_documents(source, params))}
            self.stamps = {self.inputs[0]: {}}
        elif inputs is not None:
            self.inputs, self.sizes = inputs, {}
        else:
            import fsspec

            self.inputs = resolve_inputs(source)
            for uri in self.inputs:
                info = fsspec.core.url_to_fs(uri)[0].info(uri)
                self.stamps[uri] = {"size": info.get("size") or 0,
                                    "version": str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))}
            self.sizes = {uri: stamp["size"] for uri, stamp in self.stamps.items()}
        self.total_bytes = sum(self.sizes.values())

    def chunks(self) -> Iterator[Chunk]:
        for uri in self.inputs:
            try:
                yield from self.input_chunks(uri)
            except read_errors() as exc:
                if is_transient(exc):
                    raise
                raise _unreadable(self.source, uri, exc) from None

    def input_chunks(self, uri: str) -> Iterator[Chunk]:
        """One input's chunks; its sha256 is in `input_sha256` once they are all consumed. Read errors
        propagate as they are: the caller tells a transient fault (`is_transient`) from a broken file."""
        if self.source.format == "builtin":
            return self._builtin_chunks()
        if self.source.format == "starcoderdata":
            return self._parquet_chunks(uri)
        return self._stream_chunks(uri)

    def _stream_chunks(self, uri: str) -> Iterator[Chunk]:
        with open_input(uri) as (stream, hashing):
            batches = _line_blocks(stream) if self.source.format != "text" else \
                _batched(_text_records(stream, self.source.text_unit))
            reported, first = 0, True
            for batch in batches:
                yield Chunk(batch, hashing.consumed - reported, uri, first)
                reported, first = hashing.consumed, False
            self.input_sha256[uri] = hashing.drain()
            yield Chunk(b"" if self.source.format != "text" else [], hashing.consumed - reported, uri, first)

    def _parquet_chunks(self, uri: str) -> Iterator[Chunk]:
        import pyarrow.parquet as pq

        column = text_field(self.source)
        with _local_copy(uri) as (local, sha256), open(local, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            if column not in parquet.schema_arrow.names:
                raise UserError(f"{where(self.source, 'text_field')}: column {column!r} not in {uri} "
                                f"(columns: {', '.join(parquet.schema_arrow.names)})")
            total, size = max(parquet.metadata.num_rows, 1), os.path.getsize(local)
            for index, batch in enumerate(parquet.iter_batches(batch_size=128, columns=[column])):
                yield Chunk(batch.column(0).to_pylist(), size * batch.num_rows // total, uri, index == 0)
        self.input_sha256[uri] = sha256_file(uri)
        self.input_sha256[uri] = sha256

    def _builtin_chunks(self) -> Iterator[Chunk]:
        digest = hashlib.sha256()
        batch, size = [], 0
        for document in _builtin_documents(self.source, self.params):
            encoded = document.encode()
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
            batch.append(document)
            size += len(encoded)
            if size >= CHUNK_BYTES:
                yield Chunk(batch, size, self.inputs[0])
                batch, size = [], 0
        self.input_sha256[self.inputs[0]] = digest.hexdigest()
        yield Chunk(batch, size, self.inputs[0])


def _text_records(lines, unit: str) -> Iterator[bytes]:
    """Plain text as documents: one per line, per blank-line-separated paragraph, or per file."""
    if unit == "file":
        yield lines.read()
        return
    if unit == "line":
        yield from (line.rstrip(b"\r\n") for line in lines if line.strip())
        return
    paragraph: list[bytes] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield b"".join(paragraph).rstrip(b"\r\n")
            paragraph = []
    if paragraph:
        yield b"".join(paragraph).rstrip(b"\r\n")


# ---------------------------------------------------------------- the embedded corpus


@functools.lru_cache(maxsize=2)
def _build_corpus(seed: int, entities: int, programs: int):
    from tasks.data.corpus import build_corpus

    return build_corpus(seed=seed, entities=entities, programs=programs)


def builtin_corpus(params: Params):
    """The deterministic embedded corpus (built once per process, shared by the text and code
    sources and by the eval items `prepare` writes)."""
    spec = params.data.builtin
    return _build_corpus(spec.seed, spec.entities, spec.programs)


def _builtin_documents(source: SourceParams, params: Params) -> list[str]:
    corpus = builtin_corpus(params)
    return corpus.text_documents if source.builtin_part == "text" else corpus.code_documents


def _builtin_uri(source: SourceParams, params: Params) -> str:
    spec = params.data.builtin
    return f"builtin://{source.builtin_part}?seed={spec.seed}&entities={spec.entities}&programs={spec.programs}"


# ---------------------------------------------------------------- parsing


def parse_chunk(source: SourceParams, chunk: Chunk) -> Parsed:
    """Turn one chunk's raw records into documents, counting each skipped row by reason.

    A file whose first chunk has the text field in no row at all is a misconfigured source
    (wrong `text_field`, wrong format), not bad rows: that fails at once instead of after
    skipping the whole corpus.
    """
    records = chunk.records
    if isinstance(records, bytes):
        records = [line for line in records.split(b"\n") if line.strip()]
    parsed = Parsed(documents=[], rows=len(records))
    parse = _record_parser(source)
    for record in records:
        text, reason = parse(record)
        if reason:
            parsed.skipped[reason] += 1
        else:
            parsed.documents.append(text)
    if chunk.first and parsed.rows and parsed.skipped["missing_field"] == parsed.rows:
        raise UserError(f"{where(source, 'text_field')}: no row of {chunk.input} has a text field "
                        f"{text_field(source)!r}")
    return parsed


def _record_parser(source: SourceParams):
    """record -> (document, None) or (None, why skipped), specialised once per chunk: this runs for
    every row of the corpus, so settings are looked up once, not per row."""
    if source.format not in ("slimpajama", "jsonl"):
        return _text_record
    import orjson

    loads, field = orjson.loads, text_field(source)
    excluded = frozenset(source.exclude_sets) if source.format == "slimpajama" else frozenset()

    def parse(record):
        """orjson parses the UTF-8 bytes directly (several times faster than decode + json.loads,
        which was the stage's largest cost after the tokenizer) and is stricter only in rejecting
        rows the tokenizer could not encode anyway (lone surrogates) or that are not JSON (NaN)."""
        if record is None:
            return None, "missing_field"
        try:
            row = loads(record)
        except orjson.JSONDecodeError:
            return None, _why_not_json(record)
        if type(row) is not dict:
            return None, "malformed_json"
        text = row.get(field)
        if type(text) is not str:
            return None, "missing_field"
        if excluded:
            meta = row.get("meta")
            if type(meta) is dict and meta.get("redpajama_set_name") in excluded:
                return None, "excluded_set"
        return (text, None) if text.strip() else (None, "empty")

    return parse


def _why_not_json(record: bytes | str) -> str:
    if isinstance(record, bytes):
        try:
            record.decode("utf-8")
        except UnicodeDecodeError:
            return "non_utf8"
    return "malformed_json"


def _text_record(record) -> tuple[str | None, str | None]:
    if record is None:
        return None, "missing_field"
    if isinstance(record, bytes):
        try:
            record = record.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8"
    return (record, None) if record.strip() else (None, "empty")


def iter_documents(source: SourceParams, params: Params) -> Iterator[str]:
    """Every document of a source as text, in the same order `prepare` packs them."""
    reader = SourceReader(source, params)
    for chunk in reader.chunks():
        yield from parse_chunk(source, chunk).documents
