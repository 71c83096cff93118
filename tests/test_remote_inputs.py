"""`tokenizer.model_file`, `eval.data_dir` and `sft.chat_eval.source` as s3:// URIs (tasks/remote_inputs.py),
and the 1.1B profile's SFT/DPO sources on the bucket, against a real S3 API (moto's server): read or copied
once, a missing one a one-line error naming the field, transient errors retried; that profile names no input
a node lacks (a laptop path) or that needs a hub at run time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

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


CHAT_ITEM = {"messages": [{"role": "user", "content": "Where does Ada Lind live?"}], "answer": "Oslo",
             "wrong": ["Bergen"], "column": "held-out"}


def _profile_with_chat_eval(source: str):
    from tasks.params import parse_params

    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["sft"]["chat_eval"]["source"] = source
    return parse_params(raw, "params.yaml")


def test_chat_eval_questions_from_s3_and_a_missing_file_names_the_field(bucket):
    from tasks.sft.chat_accuracy import eval_items

    bucket.pipe("inputs-bucket/sft/chat_eval.jsonl", (json.dumps(CHAT_ITEM) + "\n").encode())
    (item,) = eval_items(_profile_with_chat_eval("s3://inputs-bucket/sft/chat_eval.jsonl"))
    assert (item.answer, item.wrong, item.column) == ("Oslo", ("Bergen",), "held-out")
    with pytest.raises(UserError, match=r"^sft.chat_eval.source: file not found: s3://inputs-bucket/sft/nope.jsonl$"):
        eval_items(_profile_with_chat_eval("s3://inputs-bucket/sft/nope.jsonl"))
    bucket.pipe("inputs-bucket/sft/bad.jsonl", b'{"messages": []}\n')
    with pytest.raises(UserError, match=r"^sft.chat_eval.source: s3://inputs-bucket/sft/bad.jsonl:1: "):
        eval_items(_profile_with_chat_eval("s3://inputs-bucket/sft/bad.jsonl"))


def test_an_sft_parquet_glob_on_s3_is_read_like_the_1b_profiles(bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.params import ChatSourceParams
    from tasks.sft.reading import read_source

    row = {"prompt": "Hi?",
           "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    for part in range(2):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist([row] * 3), sink)
        bucket.pipe(f"inputs-bucket/sft/ultrachat_200k/data/train_sft-0000{part}.parquet", sink.getvalue().to_pybytes())
    source = ChatSourceParams(name="ultrachat_200k", format="messages",
                              uri="s3://inputs-bucket/sft/ultrachat_200k/data/train_sft-*.parquet")
    read = read_source(source, "sft.variants[chat].sources[ultrachat_200k]", None)
    assert (read.rows, len(read.examples)) == (6, 6) and len(read.inputs) == 2
    assert all(uri.startswith("s3://inputs-bucket/sft/") for uri in read.inputs)


def test_the_cluster_profile_names_every_input_on_the_bucket():
    """configs/tinyllama-1.1b.yaml runs in the worker image (HF_HUB_OFFLINE=1) on nodes with no laptop paths:
    its inputs are s3:// URIs (or generated), never hf:// or a local /data path."""
    from tasks.params import load_params

    params = load_params("configs/tinyllama-1.1b.yaml")
    inputs = {"tokenizer.model_file": params.tokenizer.model_file, "eval.data_dir": params.eval.data_dir,
              "sft.chat_eval.source": params.sft.chat_eval.source}
    inputs |= {f"data.sources[{s.name}].uri": s.uri for s in params.data.sources}
    for variant in params.sft.variants:
        sources = variant.sources + (variant.dpo.sources if variant.dpo else [])
        inputs |= {f"sft.variants[{variant.name}] {s.name}": s.uri for s in sources if s.format != "builtin"}
    not_on_the_bucket = {field: uri for field, uri in inputs.items() if not str(uri).startswith("s3://")}
    assert not not_on_the_bucket, not_on_the_bucket
