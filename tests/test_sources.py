"""Source readers: every format and location `prepare` and the tokenizer read, and bad input."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from pathlib import Path

import pytest
from data_fixtures import (
    GITHUB_MARKER,
    make_params,
    slimpajama_rows,
    write_jsonl,
    write_slimpajama,
    write_starcoderdata,
)

from tasks.data import sources
from tasks.data.sources import Chunk, SourceReader, iter_documents, parse_chunk
from tasks.errors import UserError


def _source(tmp_path, **spec):
    spec.setdefault("name", "src")
    spec.setdefault("weight", 1.0)
    params = make_params(tmp_path, [spec])
    return params.data.sources[0], params


def _expected_slimpajama(train: Path) -> list[str]:
    """What the SlimPajama reader must yield: every non-Github text, files in sorted path order."""
    import zstandard

    texts = []
    for path in sorted(train.rglob("*.jsonl.zst")):
        for line in zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 26).splitlines():
            row = json.loads(line)
            if row["meta"]["redpajama_set_name"] != "RedPajamaGithub":
                texts.append(row["text"])
    return texts


def test_slimpajama_layout_excludes_github_and_hashes_inputs(tmp_path):
    train = write_slimpajama(tmp_path / "SlimPajama-627B")
    source, params = _source(tmp_path, format="slimpajama", uri=f"{train}/**/*.jsonl.zst")
    reader = SourceReader(source, params)
    assert reader.inputs == sorted(str(p) for p in train.rglob("*.jsonl.zst"))
    assert reader.total_bytes == sum(p.stat().st_size for p in train.rglob("*.jsonl.zst"))

    parsed = [parse_chunk(source, chunk) for chunk in reader.chunks()]
    documents = [d for p in parsed for d in p.documents]
    assert documents == _expected_slimpajama(train)
    assert not any(GITHUB_MARKER in d for d in documents)
    assert sum(p.skipped["excluded_set"] for p in parsed) == 2 * 2 * 40 // 5
    assert sum(p.rows for p in parsed) == 2 * 2 * 40
    assert reader.input_sha256 == {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                                   for p in train.rglob("*.jsonl.zst")}


def test_exclude_sets_is_configurable(tmp_path):
    train = write_slimpajama(tmp_path / "sp", chunks=1, files_per_chunk=1)
    source, params = _source(tmp_path, format="slimpajama", uri=str(train), exclude_sets=[])
    assert sum(GITHUB_MARKER in d for d in iter_documents(source, params)) == 40 // 5


def test_compressions_and_small_chunks_give_the_same_documents(tmp_path, monkeypatch):
    rows = slimpajama_rows(seed=7, n=60, github_every=0)
    for compression, name in ((None, "a.jsonl"), ("gz", "b.jsonl.gz"), ("zst", "c.jsonl.zst")):
        write_jsonl(tmp_path / name, rows, compression)
    expected = [row["text"] for row in rows]
    monkeypatch.setattr(sources, "CHUNK_BYTES", 300)
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        source, params = _source(tmp_path, format="jsonl", uri=str(tmp_path / name))
        reader = SourceReader(source, params)
        chunks = list(reader.chunks())
        assert len(chunks) > 5
        assert [d for c in chunks for d in parse_chunk(source, c).documents] == expected
        assert sum(c.nbytes for c in chunks) == (tmp_path / name).stat().st_size


def test_starcoderdata_language_subset_by_folder(tmp_path):
    root = write_starcoderdata(tmp_path / "starcoderdata")
    source, params = _source(tmp_path, format="starcoderdata", uri=str(root), languages=["rust", "python"])
    reader = SourceReader(source, params)
    assert [Path(u).parent.name for u in reader.inputs] == ["python", "python", "rust", "rust"]
    documents = list(iter_documents(source, params))
    assert len(documents) == 4 * 30
    assert documents[0].startswith("def ") and documents[-1].startswith("fn ")
    assert not any(d.startswith("function") for d in documents)

    everything, params = _source(tmp_path, format="starcoderdata", uri=f"{root}/*/*.parquet")
    assert len(list(iter_documents(everything, params))) == 6 * 30

    missing, params = _source(tmp_path, format="starcoderdata", uri=str(root), languages=["python", "cobol"])
    with pytest.raises(UserError, match=r"data\.sources\[src\]\.languages: .*cobol"):
        SourceReader(missing, params)


def test_starcoderdata_without_its_column_fails(tmp_path):
    root = write_starcoderdata(tmp_path / "sc", languages=("python",), files=1)
    source, params = _source(tmp_path, format="starcoderdata", uri=str(root), text_field="code")
    with pytest.raises(UserError, match=r"data\.sources\[src\]\.text_field: column 'code' not in .*train-00000"):
        list(iter_documents(source, params))


@pytest.mark.parametrize("unit, expected", [
    ("paragraph", ["first line\nsecond line", "third"]),
    ("line", ["first line", "second line", "third"]),
    ("file", ["first line\nsecond line\n\n\nthird\n"]),
])
def test_text_units(tmp_path, unit, expected):
    (tmp_path / "t.txt").write_text("first line\nsecond line\n\n\nthird\n")
    source, params = _source(tmp_path, format="text", uri=str(tmp_path / "t.txt"), text_unit=unit)
    assert list(iter_documents(source, params)) == expected


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    lines = [{"text": "good one"}, b'{"text": "cut off', b"\xff\xfe not utf-8", {"other": "no text"},
             {"text": "   "}, b"[1, 2]", {"text": "good two"}, b""]
    write_jsonl(tmp_path / "bad.jsonl", lines)
    source, params = _source(tmp_path, format="jsonl", uri=str(tmp_path / "bad.jsonl"))
    parsed = [parse_chunk(source, c) for c in SourceReader(source, params).chunks()]
    assert [d for p in parsed for d in p.documents] == ["good one", "good two"]
    skipped = sum((p.skipped for p in parsed), start=Counter())
    assert dict(skipped) == {"malformed_json": 2, "non_utf8": 1, "missing_field": 1, "empty": 1}
    assert sum(p.rows for p in parsed) == 7  # the blank last line is not a row


def test_missing_text_field_fails_the_source(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"body": f"row {i}"} for i in range(10)])
    source, params = _source(tmp_path, format="jsonl", uri=str(tmp_path / "x.jsonl"))
    with pytest.raises(UserError, match=r"data\.sources\[src\]\.text_field: "
                                        r"no row of .*x\.jsonl has a text field 'text'"):
        list(iter_documents(source, params))
    chunk = Chunk([b'{"body": 1}'], input="later.jsonl", first=False)
    assert parse_chunk(source, chunk).skipped["missing_field"] == 1  # later chunks: counted, not fatal


@pytest.mark.parametrize("uri, message", [
    ("nope/missing.jsonl.zst", r"data\.sources\[src\]\.uri: file not found: '.*nope/missing\.jsonl\.zst'"),
    ("nope/*.jsonl.zst", r"data\.sources\[src\]\.uri: no files match '.*nope/\*\.jsonl\.zst'"),
    ("emptydir", r"data\.sources\[src\]\.uri: no \.jsonl/\.jsonl\.zst/\.jsonl\.gz files under '.*emptydir'"),
])
def test_missing_inputs_name_source_and_uri(tmp_path, uri, message):
    (tmp_path / "emptydir").mkdir()
    source, params = _source(tmp_path, format="slimpajama", uri=str(tmp_path / uri))
    with pytest.raises(UserError, match=message):
        SourceReader(source, params)


def test_unreadable_zst_names_the_file(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl.zst", slimpajama_rows(1, 5, 0), "zst")
    (tmp_path / "broken.jsonl.zst").write_bytes(b"this is not zstd at all" * 100)
    source, params = _source(tmp_path, format="slimpajama", uri=f"{tmp_path}/*.jsonl.zst")
    with pytest.raises(UserError, match=r"data\.sources\[src\]\.uri: cannot read .*broken\.jsonl\.zst: ZstdError"):
        list(iter_documents(source, params))


def test_relative_uris_stay_relative(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": "hello"}])
    monkeypatch.chdir(tmp_path)
    source, params = _source(tmp_path, format="jsonl", uri="raw/*.jsonl")
    assert SourceReader(source, params).inputs == ["raw/a.jsonl"]


def test_s3_source_reads_like_local(tmp_path, s3_env):
    import s3fs

    train = write_slimpajama(tmp_path / "sp", chunks=2, files_per_chunk=1, rows_per_file=25)
    bucket = f"corpus-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    fs.put(str(train), f"{bucket}/SlimPajama-627B/", recursive=True)

    source, params = _source(tmp_path, format="slimpajama", uri=f"s3://{bucket}/SlimPajama-627B/**/*.jsonl.zst")
    reader = SourceReader(source, params)
    assert reader.inputs == [f"s3://{bucket}/SlimPajama-627B/train/chunk1/example_train_0.jsonl.zst",
                             f"s3://{bucket}/SlimPajama-627B/train/chunk2/example_train_0.jsonl.zst"]
    assert [d for c in reader.chunks() for d in parse_chunk(source, c).documents] == _expected_slimpajama(train)
    assert sorted(reader.input_sha256.values()) == sorted(
        hashlib.sha256(p.read_bytes()).hexdigest() for p in train.rglob("*.zst"))

    missing, params = _source(tmp_path, format="slimpajama", uri=f"s3://{bucket}/nothing/*.jsonl.zst")
    with pytest.raises(UserError, match=rf"data\.sources\[src\]\.uri: no files match 's3://{bucket}/nothing/"):
        SourceReader(missing, params)


def test_builtin_source_is_the_embedded_corpus(tmp_path):
    from tasks.data.corpus import build_corpus

    params = make_params(tmp_path, [
        {"name": "t", "format": "builtin", "builtin_part": "text", "weight": 0.7},
        {"name": "c", "format": "builtin", "builtin_part": "code", "weight": 0.3},
    ], builtin={"seed": 5, "entities": 20, "programs": 40})
    corpus = build_corpus(seed=5, entities=20, programs=40)
    text, code = params.data.sources
    assert list(iter_documents(text, params)) == list(corpus.text_documents)
    assert list(iter_documents(code, params)) == list(corpus.code_documents)
    reader = SourceReader(text, params)
    list(reader.chunks())
    assert reader.inputs == ["builtin://text?seed=5&entities=20&programs=40"]
    assert len(reader.input_sha256[reader.inputs[0]]) == 64


def test_storage_faults_are_transient_and_broken_files_are_not():
    """What `prepare` retries (timeouts, 5xx, resets, also when s3fs wraps them) and what it reports as
    the user's to fix (a missing, forbidden or corrupt file)."""
    import zstandard

    def wrapped(cause: BaseException) -> OSError:
        try:
            raise cause
        except BaseException as exc:
            try:
                raise OSError("read failed") from exc
            except OSError as outer:
                return outer

    for exc in (TimeoutError("read timed out"), ConnectionResetError(104, "Connection reset by peer"),
                OSError("An error occurred (SlowDown) when calling GetObject: 503"),
                wrapped(ConnectionResetError()), wrapped(TimeoutError())):
        assert sources.is_transient(exc), exc
    for exc in (FileNotFoundError("s3://b/k"), PermissionError("Access Denied"), zstandard.ZstdError("bad frame"),
                OSError("not a parquet file"), wrapped(FileNotFoundError())):
        assert not sources.is_transient(exc), exc
