"""The prepare stage end to end: real tokenizer, real Parquet, real process pool, via the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import (
    GITHUB_MARKER,
    ROOT,
    slimpajama_rows,
    write_jsonl,
    write_params,
    write_slimpajama,
    write_starcoderdata,
)

from model.tokenizer import Tokenizer
from tasks.cli import main as cli
from tasks.data import encoding, sources
from tasks.data.packing import Packer, is_val
from tasks.data.shards import ShardWriter
from tasks.data.sources import iter_documents

ASSETS = ROOT.parent / "shared" / "assets"
SMALL = dict(seq_len=32, rows_per_shard=50, row_group_rows=16, val_fraction=0.1, encode_processes=2)


@pytest.fixture(autouse=True)
def _ray_for_stage_runs(request):
    """Tests that run the stage (they all take a tokenizer) get the module's Ray."""
    if "small_tokenizer_dir" in request.fixturenames:
        request.getfixturevalue("shared_ray")


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray for the module's in-process runs (the stage uses a Ray already up in its process
    instead of starting its own): a Ray start costs seconds, more than these corpora take to tokenize.
    The runs in a subprocess start their own, as the CLI does."""
    import tempfile

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=tempfile.mkdtemp(prefix="tl-ray-", dir="/tmp"))
    yield
    ray.shutdown()


def _corpus(tmp_path) -> list[dict]:
    """A SlimPajama source and a Starcoderdata source in their real layouts, mixed 7:3."""
    train = write_slimpajama(tmp_path / "raw" / "SlimPajama-627B")
    code = write_starcoderdata(tmp_path / "raw" / "starcoderdata")
    return [{"name": "slimpajama", "format": "slimpajama", "uri": f"{train}/**/*.jsonl.zst", "weight": 0.693584},
            {"name": "starcoderdata", "format": "starcoderdata", "uri": str(code), "weight": 0.306416,
             "languages": ["python", "rust"]}]


def _setup(tmp_path, tokenizer_dir, sources_, **data) -> Path:
    shutil.copytree(tokenizer_dir, tmp_path / "models" / "tokenizer", dirs_exist_ok=True)
    return write_params(tmp_path, sources_, **{**SMALL, **data})


def _run(params_file: Path) -> int:
    return cli(["prepare", "--params", str(params_file)])


def _manifest(tmp_path) -> dict:
    return json.loads((tmp_path / "data" / "prepared" / "manifest.json").read_text())


def _rows(tmp_path, manifest, name, split) -> np.ndarray:
    shards = manifest["sources"][name]["splits"][split]["shards"]
    if not shards:
        return np.empty((0, manifest["row_len"]), dtype=manifest["dtype"])
    tables = [pq.read_table(tmp_path / "data" / "prepared" / s) for s in shards]
    flat = np.concatenate([t.column("tokens").combine_chunks().flatten().to_numpy() for t in tables])
    return flat.reshape(-1, manifest["row_len"])


def _expected_streams(tmp_path, source_index: int, separator: str) -> dict[str, list[int]]:
    """Each split's id stream rebuilt independently: documents one by one through
    `Tokenizer.encode` (not the stage's batch path), separators per policy, split by document."""
    params = _params(tmp_path)
    source = params.data.sources[source_index]
    tokenizer = Tokenizer.load(tmp_path / "models" / "tokenizer")
    documents = list(iter_documents(source, params))
    val = is_val(np.arange(len(documents), dtype=np.uint64), params.data.val_fraction)
    streams = {"train": [], "val": []}
    for document, in_val in zip(documents, val):
        streams["val" if in_val else "train"] += tokenizer.encode(
            document, bos=separator in ("bos", "both"), eos=separator in ("eos", "both"))
    return streams


def _params(tmp_path):
    from tasks.params import load_params

    return load_params(tmp_path / "params.yaml")


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _nothing_written(tmp_path) -> bool:
    """No output, and nothing in the staging dir a later run could trust but sealed units."""
    data, staging = tmp_path / "data", tmp_path / "data" / ".prepare.tmp"
    return (not (data / "prepared").exists() and not (staging / "prepared").exists()
            and not (staging / "eval").exists() and not list(staging.rglob("*.partial")))


# ---------------------------------------------------------------- processing


@pytest.mark.parametrize("separator", ["bos", "eos", "both"])
def test_packing_keeps_every_token_and_matches_the_contract(tmp_path, small_tokenizer_dir, separator):
    params_file = _setup(tmp_path, small_tokenizer_dir, _corpus(tmp_path), separator=separator)
    assert _run(params_file) == 0
    manifest = _manifest(tmp_path)
    tokenizer = Tokenizer.load(tmp_path / "models" / "tokenizer")
    assert {k: manifest[k] for k in ("version", "seq_len", "row_len", "vocab_size", "dtype", "separator",
                                     "tokenizer_sha256")} == {
        "version": 1, "seq_len": 32, "row_len": 33, "vocab_size": 512, "dtype": "uint16",
        "separator": separator, "tokenizer_sha256": tokenizer.sha256}
    assert list(manifest["sources"]) == ["slimpajama", "starcoderdata"]

    for index, name in enumerate(manifest["sources"]):
        entry = manifest["sources"][name]
        expected = _expected_streams(tmp_path, index, separator)
        for split in ("train", "val"):
            rows, stats = _rows(tmp_path, manifest, name, split), entry["splits"][split]
            stream = expected[split]
            assert rows.shape == (stats["rows"], 33) and stats["tokens"] == rows.size
            # nothing lost or duplicated: the rows are the stream, minus only the final partial row
            assert rows.reshape(-1).tolist() == stream[:rows.size]
            assert stats["dropped_tokens"] == len(stream) - rows.size < 33
        assert entry["splits"]["train"]["rows"] > 5 * entry["splits"]["val"]["rows"] > 0
        for split in ("train", "val"):
            ids = np.concatenate([rows.reshape(-1), np.asarray(expected[split][rows.size:], dtype=np.uint16)]) \
                if (rows := _rows(tmp_path, manifest, name, split)).size else np.asarray(expected[split])
            separator_id = tokenizer.bos_id if separator != "eos" else tokenizer.eos_id
            assert int((ids == separator_id).sum()) == entry["splits"][split]["documents"]

    slim = manifest["sources"]["slimpajama"]
    assert slim["format"] == "slimpajama" and slim["input_rows"] == 160
    assert slim["skipped"] == {"malformed_json": 0, "non_utf8": 0, "missing_field": 0, "excluded_set": 32, "empty": 0}
    assert sum(s["documents"] for s in slim["splits"].values()) == 128
    assert len(slim["inputs"]) == 4 and all(len(h) == 64 for h in slim["inputs"].values())
    assert len(manifest["sources"]["starcoderdata"]["inputs"]) == 4  # python + rust folders only
    assert json.loads((tmp_path / "data" / "eval" / "tasks.json").read_text()) == {}  # no builtin source


def test_shards_rows_and_row_groups(tmp_path, small_tokenizer_dir):
    params_file = _setup(tmp_path, small_tokenizer_dir, _corpus(tmp_path)[:1], rows_per_shard=20, row_group_rows=8)
    assert _run(params_file) == 0
    manifest = _manifest(tmp_path)
    shards = manifest["sources"]["slimpajama"]["splits"]["train"]["shards"]
    assert shards[:2] == ["slimpajama/train/shard-00000.parquet", "slimpajama/train/shard-00001.parquet"]
    sizes = []
    for shard in shards:
        parquet = pq.ParquetFile(tmp_path / "data" / "prepared" / shard)
        assert parquet.schema_arrow.names == ["tokens"]
        assert parquet.schema_arrow.field("tokens").type.value_type == pa.uint16()
        groups = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        assert max(groups) <= 8
        sizes.append(parquet.metadata.num_rows)
    assert all(size == 20 for size in sizes[:-1]) and 0 < sizes[-1] <= 20
    assert sum(sizes) == manifest["sources"]["slimpajama"]["splits"]["train"]["rows"]


def test_uint32_for_large_vocabularies(tmp_path):
    writer = ShardWriter(tmp_path, "big/train", 5, np.dtype(np.uint32), rows_per_shard=3, row_group_rows=2)
    packer = Packer(5, np.uint32)
    writer.write(packer.add(np.arange(70_000, 70_023, dtype=np.uint32)))
    writer.close()
    table = pq.read_table(tmp_path / "big/train/shard-00000.parquet")
    assert table.schema.field("tokens").type.value_type == pa.uint32()
    assert table.column("tokens").to_pylist()[0] == [70_000, 70_001, 70_002, 70_003, 70_004]
    assert writer.rows == 4 and writer.shards == ["big/train/shard-00000.parquet", "big/train/shard-00001.parquet"]
    assert packer.dropped == 3


def test_val_split_is_a_stable_fraction_of_documents():
    mask = is_val(np.arange(200_000, dtype=np.uint64), 0.02)
    assert 0.018 < mask.mean() < 0.022
    assert (mask[1000:2000] == is_val(np.arange(1000, 2000, dtype=np.uint64), 0.02)).all()


def test_excluded_github_rows_never_reach_the_shards(tmp_path, small_tokenizer_dir):
    tokenizer = Tokenizer.load(small_tokenizer_dir)
    corpus = _corpus(tmp_path)[:1]
    for exclude, marker_expected in (([], True), (["RedPajamaGithub"], False)):
        params_file = _setup(tmp_path, small_tokenizer_dir, [{**corpus[0], "exclude_sets": exclude}])
        assert _run(params_file) == 0
        manifest = _manifest(tmp_path)
        text = "".join(tokenizer.decode(row) for split in ("train", "val")
                       for row in _rows(tmp_path, manifest, "slimpajama", split).tolist())
        assert (GITHUB_MARKER in text) is marker_expected


def test_same_shards_for_any_worker_count_and_any_mix(tmp_path, small_tokenizer_dir, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1500)  # many chunks per input
    monkeypatch.setattr(encoding, "PART_IDS", 700)     # and many parts per unit, sent back in order
    corpus = _corpus(tmp_path)
    outputs = []
    for workers, weights in ((1, (0.7, 0.3)), (2, (0.7, 0.3)), (4, (0.7, 0.3)), (2, (0.2, 0.8))):
        mixed = [{**s, "weight": w} for s, w in zip(corpus, weights)]
        assert _run(_setup(tmp_path, small_tokenizer_dir, mixed, encode_processes=workers)) == 0
        outputs.append(_files(tmp_path / "data" / "prepared"))
    assert len(outputs[0]) > 4
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]


def test_builtin_corpus_writes_eval_items_never_seen_in_training(tmp_path, small_tokenizer_dir):
    builtin = [{"name": "builtin-text", "format": "builtin", "builtin_part": "text", "weight": 0.7},
               {"name": "builtin-code", "format": "builtin", "builtin_part": "code", "weight": 0.3}]
    params_file = _setup(tmp_path, small_tokenizer_dir, builtin, builtin={"seed": 3, "entities": 8, "programs": 40})
    assert _run(params_file) == 0
    manifest = _manifest(tmp_path)
    assert list(manifest["sources"]["builtin-text"]["inputs"]) == ["builtin://text?seed=3&entities=8&programs=40"]
    tasks = json.loads((tmp_path / "data" / "eval" / "tasks.json").read_text())
    assert set(tasks) == {"tiny_facts", "tiny_paraphrase", "tiny_two_hop", "tiny_code"}
    tokenizer = Tokenizer.load(small_tokenizer_dir)
    training = "".join(tokenizer.decode(row) for name in manifest["sources"]
                       for row in _rows(tmp_path, manifest, name, "train").tolist())
    for task, info in tasks.items():
        items = [json.loads(line) for line in (tmp_path / "data" / "eval" / f"{task}.jsonl").read_text().splitlines()]
        assert len(items) == info["n"] > 0
        # the scorer reads `query + " " + choice` (lm-eval's target delimiter): that exact text must be unseen
        assert not any(item["query"] + " " + item["choices"][item["gold"]] in training for item in items)


@pytest.mark.slow
@pytest.mark.skipif(not (ASSETS / "pretrain" / "text").is_dir(), reason="shared/assets not present")
def test_real_text_with_the_llama2_tokenizer(tmp_path):
    from model.tokenizer import save_tokenizer_dir

    text = ASSETS / "pretrain" / "text"
    save_tokenizer_dir((ASSETS / "tokenizer" / "llama2c_tokenizer.model").read_bytes(),
                       tmp_path / "models" / "tokenizer")
    params_file = write_params(tmp_path, [
        {"name": "c4", "format": "jsonl", "uri": str(text / "c4_demo.jsonl"), "weight": 1},
        {"name": "wiki", "format": "text", "uri": str(text / "wiki_demo.txt"), "text_unit": "line", "weight": 1},
        {"name": "shakespeare", "format": "text", "uri": str(text / "tinyshakespeare_input.txt"), "weight": 1},
    ], seq_len=256, val_fraction=0.05)
    assert _run(params_file) == 0
    manifest = _manifest(tmp_path)
    assert manifest["vocab_size"] == 32000 and manifest["dtype"] == "uint16"
    assert manifest["sources"]["c4"]["input_rows"] == 300
    assert sum(s["documents"] for s in manifest["sources"]["wiki"]["splits"].values()) == 30
    tokenizer = Tokenizer.load(tmp_path / "models" / "tokenizer")
    c4 = [json.loads(line)["text"] for line in (text / "c4_demo.jsonl").read_text().splitlines()]
    row = _rows(tmp_path, manifest, "c4", "train")[0].tolist()
    assert row[0] == tokenizer.bos_id
    assert any(document.startswith(tokenizer.decode(row[1:])[:200]) for document in c4)
    shakespeare = manifest["sources"]["shakespeare"]["splits"]["train"]
    assert shakespeare["tokens"] > 250_000  # ~1.1 MB of English at ~4 bytes per Llama 2 token


# ---------------------------------------------------------------- bad input


def _fails(capsys, params_file, *needles) -> None:
    assert _run(params_file) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message


def test_missing_file_and_empty_glob(tmp_path, small_tokenizer_dir, capsys):
    for uri in (str(tmp_path / "nowhere.jsonl.zst"), f"{tmp_path}/raw/*.jsonl.zst"):
        params_file = _setup(tmp_path, small_tokenizer_dir, [{"name": "sp", "format": "slimpajama", "uri": uri,
                                                             "weight": 1}])
        _fails(capsys, params_file, "data.sources[sp].uri", uri)
        assert _nothing_written(tmp_path)


def test_unreadable_zst_after_a_good_source(tmp_path, small_tokenizer_dir, capsys):
    corpus = _corpus(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "example_train_0.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 50)
    broken = {"name": "broken", "format": "slimpajama", "uri": str(tmp_path / "broken"), "weight": 1}
    _fails(capsys, _setup(tmp_path, small_tokenizer_dir, [*corpus, broken]),
           "data.sources[broken].uri", "example_train_0.jsonl.zst")
    assert _nothing_written(tmp_path)


def test_bad_rows_counted_then_fatal_above_the_fraction(tmp_path, small_tokenizer_dir, capsys):
    rows = slimpajama_rows(seed=3, n=98, github_every=0)
    write_jsonl(tmp_path / "raw" / "mixed.jsonl", rows[:50] + [b'{"text": "unterminated', b"\xc3\x28 bad"] + rows[50:])
    spec = [{"name": "web", "format": "jsonl", "uri": str(tmp_path / "raw" / "mixed.jsonl"), "weight": 1}]

    _fails(capsys, _setup(tmp_path, small_tokenizer_dir, spec, max_bad_fraction=0.01),
           "data.sources[web]", "2 of 100 rows are bad", "malformed_json 1", "non_utf8 1", "max_bad_fraction=0.01")
    assert _nothing_written(tmp_path)

    assert _run(_setup(tmp_path, small_tokenizer_dir, spec, max_bad_fraction=0.05)) == 0
    source = _manifest(tmp_path)["sources"]["web"]
    assert source["skipped"] == {"malformed_json": 1, "non_utf8": 1, "missing_field": 0, "excluded_set": 0, "empty": 0}
    assert source["input_rows"] == 100
    assert sum(s["documents"] for s in source["splits"].values()) == 98


def test_missing_text_field(tmp_path, small_tokenizer_dir, capsys):
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"content": f"row {i}"} for i in range(20)])
    spec = [{"name": "web", "format": "jsonl", "uri": str(tmp_path / "raw" / "a.jsonl"), "weight": 1}]
    _fails(capsys, _setup(tmp_path, small_tokenizer_dir, spec), "data.sources[web].text_field", "'text'")
    assert _nothing_written(tmp_path)


def test_parquet_without_the_text_column(tmp_path, small_tokenizer_dir, capsys):
    code = write_starcoderdata(tmp_path / "raw" / "sc", languages=("python",), files=1)
    spec = [{"name": "code", "format": "starcoderdata", "uri": str(code), "weight": 1, "text_field": "body"}]
    _fails(capsys, _setup(tmp_path, small_tokenizer_dir, spec), "data.sources[code].text_field", "'body'",
           "train-00000-of-00001.parquet")
    assert _nothing_written(tmp_path)


def test_more_workers_than_the_clusters_resources_is_a_user_error(tmp_path, small_tokenizer_dir, capsys):
    spec = [{"name": "sp", "format": "slimpajama", "uri": str(write_slimpajama(tmp_path / "raw", 1, 1)), "weight": 1}]
    _fails(capsys, _setup(tmp_path, small_tokenizer_dir, spec, resources_per_worker={"prepare": 1}),
           "data.resources_per_worker", "prepare")
    assert _nothing_written(tmp_path)


def test_weights_and_tokenizer_are_checked(tmp_path, small_tokenizer_dir, capsys):
    corpus = _corpus(tmp_path)
    params_file = _setup(tmp_path, small_tokenizer_dir, corpus)
    text = params_file.read_text().replace("weight: 0.693584", "weight: 0").replace("weight: 0.306416", "weight: -1")
    params_file.write_text(text)
    _fails(capsys, params_file, "data.sources.0.weight", "(got 0")
    params_file = _setup(tmp_path, small_tokenizer_dir, corpus)
    shutil.rmtree(tmp_path / "models")
    _fails(capsys, params_file, "paths.models", "tokenizer")
    assert _nothing_written(tmp_path)


def test_failed_run_keeps_the_previous_output(tmp_path, small_tokenizer_dir, capsys):
    corpus = _corpus(tmp_path)
    assert _run(_setup(tmp_path, small_tokenizer_dir, corpus)) == 0
    before = _files(tmp_path / "data" / "prepared")
    broken = {"name": "gone", "format": "jsonl", "uri": str(tmp_path / "missing.jsonl"), "weight": 1}
    _fails(capsys, _setup(tmp_path, small_tokenizer_dir, [*corpus, broken]), "data.sources[gone].uri")
    assert _files(tmp_path / "data" / "prepared") == before


RAY_AGENTS = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def _name(process) -> str:
    """The process's name, or "" once it is gone."""
    import psutil

    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


@pytest.mark.slow
def test_killed_run_keeps_sealed_inputs_and_the_rerun_writes_the_same_bytes(tmp_path, small_tokenizer_dir):
    """SIGKILL mid-run: the previous output stays whole, the Ray it started goes with it, the inputs it
    sealed are kept and nothing half-written is trusted; the rerun tokenizes only the rest and writes
    exactly what an uninterrupted run writes."""
    import contextlib

    import psutil

    small = [{"name": "sp", "format": "slimpajama", "uri": str(write_slimpajama(tmp_path / "small", 1, 1)),
              "weight": 1}]
    big = [{"name": "sp", "format": "slimpajama",
            "uri": str(write_slimpajama(tmp_path / "big", chunks=3, files_per_chunk=3, rows_per_file=600)),
            "weight": 1}]
    assert _run(_setup(tmp_path, small_tokenizer_dir, small)) == 0
    before = _files(tmp_path / "data" / "prepared")

    params_file = _setup(tmp_path, small_tokenizer_dir, big, rows_per_shard=64, row_group_rows=16)
    units = tmp_path / "data" / ".prepare.tmp" / "units"
    process = subprocess.Popen([sys.executable, "-m", "tasks.cli", "prepare", "--params", str(params_file)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(units.rglob("*.json"))) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        children = psutil.Process(process.pid).children(recursive=True)
        agents = [child for child in children if _name(child) in RAY_AGENTS]
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed: make the corpus bigger"
    # Everything that could still write goes with the driver. Ray's own agents linger: each publishes the raylet's
    # death to the (dead) GCS under Ray's fixed 60 s timeout before exiting (Ray's code, not ours): the test ends them.
    _, alive = psutil.wait_procs([child for child in children if child not in agents], timeout=30)
    assert not alive, f"orphaned processes still running: {[(p.pid, p.name()) for p in alive]}"
    for agent in agents:
        with contextlib.suppress(psutil.NoSuchProcess):
            agent.kill()
    assert _files(tmp_path / "data" / "prepared") == before
    sealed = len(list(units.rglob("*.json")))
    assert 2 <= sealed < 9

    result = subprocess.run([sys.executable, "-m", "tasks.cli", "prepare", "--params", str(params_file)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{sealed} of 9 inputs already tokenized" in result.stdout
    assert not (tmp_path / "data" / ".prepare.tmp").exists()
    # the driver's lines (what `data.seal_/pack_tokens_per_second` are read from): it tokenized the rest, packed all
    splits = json.loads((tmp_path / "data" / "prepared" / "manifest.json").read_text())["sources"]["sp"]["splits"]
    counts = {phase: int(tokens.replace(",", "")) for phase, tokens in re.findall(
        r"prepare: (tokenized|packed) ([\d,]+) tokens in [\d.]+s; the driver used .* per driver CPU-second",
        result.stdout)}
    assert counts["packed"] == sum(split["tokens"] + split["dropped_tokens"] for split in splits.values())
    assert 0 < counts["tokenized"] < counts["packed"], result.stdout
    rerun = _files(tmp_path / "data" / "prepared")
    shutil.rmtree(tmp_path / "data")
    assert _run(params_file) == 0
    assert _files(tmp_path / "data" / "prepared") == rerun != before


def test_a_stale_or_broken_sealed_unit_is_made_again(tmp_path, small_tokenizer_dir):
    """Units left by an earlier run are used only while their files match their seal and their input."""
    from tasks.data.shards import token_dtype
    from tasks.data.stage import plan_units
    from tasks.data.units import IDS, UnitWriter, load_sealed

    spec = [{"name": "sp", "format": "slimpajama", "uri": str(write_slimpajama(tmp_path / "raw", 1, 2)),
             "weight": 1}]
    params_file = _setup(tmp_path, small_tokenizer_dir, spec)
    assert _run(params_file) == 0
    expected = _files(tmp_path / "data" / "prepared")
    params = _params(tmp_path)
    tokenizer = Tokenizer.load(tmp_path / "models" / "tokenizer")
    dtype = token_dtype(tokenizer.vocab_size)
    units = plan_units([sources.SourceReader(s, params) for s in params.data.sources], params, tokenizer, dtype)
    directory = tmp_path / "data" / ".prepare.tmp" / "units" / "sp"
    for unit in units:  # sealed units of wrong tokens: a flipped id in one, a torn file in the other
        writer = UnitWriter(directory, unit.key, dtype)
        writer.append(np.arange(10, dtype=dtype).tobytes(), np.array([10], np.int64).tobytes(), 1, {})
        writer.seal(unit.uri, "0" * 64)
    (directory / f"{units[0].key}{IDS}").write_bytes(np.arange(1, 11, dtype=dtype).tobytes())
    (directory / f"{units[1].key}{IDS}").write_bytes(np.arange(5, dtype=dtype).tobytes())
    assert all(load_sealed(directory, unit, dtype) is None for unit in units)
    assert _run(params_file) == 0
    assert _files(tmp_path / "data" / "prepared") == expected

    (tmp_path / "raw" / "train" / "chunk1" / "example_train_0.jsonl.zst").write_bytes(
        (tmp_path / "raw" / "train" / "chunk1" / "example_train_1.jsonl.zst").read_bytes())
    renewed = [u.key for u in plan_units([sources.SourceReader(s, params) for s in params.data.sources], params,
                                         tokenizer, dtype)]
    assert renewed[0] != units[0].key and renewed[1] == units[1].key  # a changed input has a new key


def test_encode_processes_is_validated(tmp_path, small_tokenizer_dir, capsys):
    spec = [{"name": "sp", "format": "slimpajama", "uri": str(write_slimpajama(tmp_path / "raw", 1, 1)), "weight": 1}]
    params_file = _setup(tmp_path, small_tokenizer_dir, spec)
    params_file.write_text(params_file.read_text().replace("encode_processes: 2", "encode_processes: 0"))
    _fails(capsys, params_file, "data.encode_processes")
    assert _nothing_written(tmp_path)


def test_plan_states_prepares_time_for_the_profiles_corpus():
    """`tinyllama plan` puts prepare's time beside training's: tokenizing takes the longer of the workers (the
    corpus over their tokens per CPU-second) and the driver sealing every token, then the driver packs every
    token; with the 1.1B profile's 256 workers the driver is the bound."""
    from tasks.params import load_params, parse_tokens
    from tasks.pretrain.plan import make_plan, render

    params = load_params(ROOT / "configs" / "tinyllama-1.1b.yaml")
    plan = make_plan(params)
    data = params.data
    assert plan.prepare["corpus_tokens"] == parse_tokens("950B") == data.corpus_tokens
    workers_days = data.corpus_tokens / (data.tokens_per_cpu_second * data.encode_processes) / 86400
    seal_days = data.corpus_tokens / data.seal_tokens_per_second / 86400
    pack_days = data.corpus_tokens / data.pack_tokens_per_second / 86400
    assert seal_days > workers_days
    assert plan.prepare["workers_days"] == pytest.approx(workers_days)
    assert plan.prepare["days"] == pytest.approx(seal_days + pack_days)
    line = next(line for line in render(plan, 40).splitlines() if line.startswith("prepare"))
    assert "950B tokens" in line and f"{data.encode_processes} CPU workers" in line
    assert "bound by the driver sealing" in line
    params.data.encode_processes = 8  # too few workers: they are the bound, the driver still packs
    assert make_plan(params).prepare["days"] == pytest.approx(workers_days * 32 + pack_days)
    assert "bound by 8 CPU workers" in render(make_plan(params), 40)
    params.data.pack_tokens_per_second *= 2
    assert make_plan(params).prepare["pack_days"] == pytest.approx(pack_days / 2)
