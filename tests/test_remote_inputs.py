"""`tokenizer.model_file` and `eval.data_dir` as s3:// URIs (tasks/remote_inputs.py), against a real S3 API
(moto's server): read or copied once, a missing one a one-line error naming the field, transient errors retried."""

from __future__ import annotations

import pytest

from tasks.errors import UserError
from tasks.remote_inputs import local_input_dir, read_input_file, with_retries


@pytest.fixture
def bucket(s3_env):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("inputs-bucket")
    yield fs
    fs.rm("inputs-bucket", recursive=True)


def test_a_file_uri_is_read_and_a_missing_one_names_the_field(bucket, tmp_path):
    bucket.pipe("inputs-bucket/tokenizers/tokenizer.model", b"sentencepiece bytes")
    assert read_input_file("s3://inputs-bucket/tokenizers/tokenizer.model", "tokenizer.model_file") == \
        b"sentencepiece bytes"
    with pytest.raises(UserError, match=r"^tokenizer.model_file: file not found: s3://inputs-bucket/nope.model$"):
        read_input_file("s3://inputs-bucket/nope.model", "tokenizer.model_file")
    (tmp_path / "local.model").write_bytes(b"local")
    assert read_input_file(str(tmp_path / "local.model"), "tokenizer.model_file") == b"local"


def test_a_dir_uri_is_copied_once_with_its_layout(bucket, tmp_path):
    bucket.pipe("inputs-bucket/eval/arc_easy/ARC-Easy-Test.jsonl", b'{"id": 1}\n')
    bucket.pipe("inputs-bucket/eval/piqa/valid.jsonl", b'{"goal": "x"}\n')
    local = local_input_dir("s3://inputs-bucket/eval", "eval.data_dir", cache_root=tmp_path / "cache")
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == \
        ["arc_easy/ARC-Easy-Test.jsonl", "piqa/valid.jsonl"]
    assert (local / "piqa" / "valid.jsonl").read_bytes() == b'{"goal": "x"}\n'
    bucket.rm("inputs-bucket/eval", recursive=True)  # a second call reuses the copy
    assert local_input_dir("s3://inputs-bucket/eval/", "eval.data_dir", cache_root=tmp_path / "cache") == local
    with pytest.raises(UserError, match=r"^eval.data_dir: no files under s3://inputs-bucket/empty$"):
        local_input_dir("s3://inputs-bucket/empty", "eval.data_dir", cache_root=tmp_path / "cache")


def test_transient_errors_are_retried_and_missing_files_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "read"

    assert with_retries(flaky, "s3://b/k", delay_s=0) == "read" and len(calls) == 3
    with pytest.raises(FileNotFoundError):
        with_retries(lambda: (calls.append(1), open("/nonexistent/x"))[1], "missing", delay_s=0)
    assert len(calls) == 4, "a missing file is not retried"
