"""S3 end to end against moto's server on 127.0.0.1: `prepare` reading its corpus from `s3://`,
and the prepared data versioned by the real DVC CLI with an S3 remote (repro, push, pull)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from data_fixtures import write_params, write_slimpajama, write_starcoderdata

from tasks.cli import main as cli

DVC = Path(sys.executable).with_name("dvc")


def _bucket(tmp_path: Path, *trees: tuple[Path, str]) -> str:
    """A fresh bucket holding each local tree under its key prefix."""
    import s3fs

    bucket = f"tinyllama-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    for local, prefix in trees:
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(path), f"{bucket}/{prefix}/{path.relative_to(local).as_posix()}")
    return bucket


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_prepare_reads_sources_from_s3(tmp_path, s3_env, small_tokenizer_dir):
    raw = tmp_path / "raw"
    bucket = _bucket(tmp_path, (write_slimpajama(raw / "SlimPajama-627B"), "SlimPajama-627B/train"),
                     (write_starcoderdata(raw / "starcoderdata"), "starcoderdata"))
    shutil.copytree(small_tokenizer_dir, tmp_path / "models" / "tokenizer")

    def run(location: str) -> dict[str, bytes]:
        sources = [{"name": "slimpajama", "format": "slimpajama", "uri": f"{location}/SlimPajama-627B/**/*.jsonl.zst",
                    "weight": 0.7},
                   {"name": "starcoderdata", "format": "starcoderdata", "uri": f"{location}/starcoderdata",
                    "languages": ["python"], "weight": 0.3}]
        params_file = write_params(tmp_path, sources, seq_len=32, val_fraction=0.1)
        assert cli(["prepare", "--params", str(params_file)]) == 0
        return _files(tmp_path / "data" / "prepared")

    from_s3 = run(f"s3://{bucket}")
    manifest = json.loads(from_s3["manifest.json"])
    assert list(manifest["sources"]["slimpajama"]["inputs"])[0] == \
        f"s3://{bucket}/SlimPajama-627B/train/chunk1/example_train_0.jsonl.zst"
    local = run(str(raw))
    assert {k: v for k, v in local.items() if k != "manifest.json"} == \
        {k: v for k, v in from_s3.items() if k != "manifest.json"}


def test_shards_on_shared_storage_are_content_addressed_and_the_manifest_is_all_that_stays(tmp_path, s3_env,
                                                                                            small_tokenizer_dir):
    """`paths.shared` (the cluster profile): shards go to `<shared>/shards/<sha256>.parquet`, each written once,
    and `data/prepared` (DVC's output) holds only the manifest naming them; training reads them back from
    S3 through the manifest, every row counted."""
    import s3fs

    from tasks.params import load_params
    from tasks.pretrain.loader import open_prepared

    raw = tmp_path / "raw"
    shutil.copytree(small_tokenizer_dir, tmp_path / "models" / "tokenizer")
    bucket = _bucket(tmp_path)
    sources = [{"name": "slimpajama", "format": "slimpajama", "uri": str(write_slimpajama(raw / "sp")), "weight": 1}]
    params_file = write_params(tmp_path, sources, seq_len=32, val_fraction=0.1, rows_per_shard=40)
    raw_params = yaml.safe_load(params_file.read_text())
    raw_params["paths"]["shared"] = f"s3://{bucket}/pipeline"
    raw_params["tokenizer"]["vocab_size"] = 512  # small_tokenizer_dir's
    params_file.write_text(yaml.safe_dump(raw_params))
    assert cli(["prepare", "--params", str(params_file)]) == 0

    assert sorted(p.name for p in (tmp_path / "data" / "prepared").iterdir()) == ["manifest.json"]
    manifest = json.loads((tmp_path / "data" / "prepared" / "manifest.json").read_text())
    fs = s3fs.S3FileSystem()
    for split in manifest["sources"]["slimpajama"]["splits"].values():
        assert split["shards"], "every split has shards"
        for uri in split["shards"]:
            digest = split["shard_sha256"][uri]
            assert uri == f"s3://{bucket}/pipeline/shards/{digest}.parquet"
            assert hashlib.sha256(fs.cat_file(uri)).hexdigest() == digest
    stored = sorted(fs.ls(f"{bucket}/pipeline/shards"))
    assert cli(["prepare", "--params", str(params_file)]) == 0  # the same data again: nothing new stored
    assert sorted(fs.ls(f"{bucket}/pipeline/shards")) == stored

    data = open_prepared(load_params(params_file))
    assert data.train["slimpajama"].rows == manifest["sources"]["slimpajama"]["splits"]["train"]["rows"]
    assert all(uri.startswith("s3://") for uri in data.train["slimpajama"].shards)


def _dvc(repo: Path, *args: str, env: dict) -> str:
    result = subprocess.run([str(DVC), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _project(tmp_path: Path, small_tokenizer_dir: Path, s3_env: str) -> tuple[Path, dict]:
    """A DVC project repo whose prepare stage runs our CLI, with a default remote on a fresh bucket; and the
    environment DVC runs in, which reaches the remote through its own `endpointurl` setting (AWS_ENDPOINT_URL
    is unset for it)."""
    repo = tmp_path / "project"
    repo.mkdir()
    write_slimpajama(repo / "raw" / "SlimPajama-627B", chunks=1)
    shutil.copytree(small_tokenizer_dir, repo / "models" / "tokenizer")
    params_file = write_params(tmp_path, [{"name": "slimpajama", "format": "slimpajama",
                                           "uri": "raw/SlimPajama-627B", "weight": 1}], seq_len=32)
    params = yaml.safe_load(params_file.read_text())
    params["paths"] = {"data": "data", "models": "models", "metrics": "metrics"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": {
        # and a metric kept in git, as the pipeline's stages have (`cache: false`: `dvc push` leaves it out)
        "cmd": f"{sys.executable} -m tasks.cli prepare --params params.yaml"
               " && mkdir -p metrics && cp data/prepared/manifest.json metrics/prepare.json",
        "deps": ["raw/SlimPajama-627B", "models/tokenizer"],
        "params": ["data"],
        "outs": ["data/prepared"],
        "metrics": [{"metrics/prepare.json": {"cache": False}}],
    }}}))

    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    bucket = _bucket(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q", env=env)
    _dvc(repo, "config", "core.analytics", "false", env=env)
    _dvc(repo, "remote", "add", "-d", "storage", f"s3://{bucket}/dvcstore", env=env)
    _dvc(repo, "remote", "modify", "storage", "endpointurl", s3_env, env=env)
    return repo, env


@pytest.mark.slow
def test_dvc_repro_push_and_clean_pull_through_an_s3_remote(tmp_path, s3_env, small_tokenizer_dir):
    """The second `dvc repro` is a no-op, and the outputs pushed to an S3 remote come back byte-identical
    after wiping outputs and cache."""
    repo, env = _project(tmp_path, small_tokenizer_dir, s3_env)
    _dvc(repo, "repro", "prepare", env=env)
    prepared = _files(repo / "data" / "prepared")
    assert "manifest.json" in prepared and any(k.endswith(".parquet") for k in prepared)
    again = _dvc(repo, "repro", "prepare", env=env)
    assert "didn't change, skipping" in again
    assert _files(repo / "data" / "prepared") == prepared

    _dvc(repo, "push", env=env)
    shutil.rmtree(repo / "data" / "prepared")
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc(repo, "pull", env=env)
    assert _files(repo / "data" / "prepared") == prepared
    assert "in sync" in _dvc(repo, "status", "--cloud", env=env)


@pytest.mark.slow
def test_a_new_head_restores_a_stage_the_lost_one_synced_instead_of_running_it(tmp_path, s3_env,
                                                                                small_tokenizer_dir):
    """The flow's stage runner on a cluster run (`python -m flows.repro STAGE --sync-remote`): the stage runs and
    pushes its outputs and run cache; on a "new head" (no dvc.lock, no outputs, no DVC cache: what a clone of
    the repo has) the same command restores the stage from the remote without running its command, with the
    same bytes and the same dvc.lock."""
    from flows.repro import RAN, RESTORED, UP_TO_DATE

    repo, env = _project(tmp_path, small_tokenizer_dir, s3_env)

    def stage_runner() -> list[str]:
        result = subprocess.run([sys.executable, "-m", "flows.repro", "prepare", "--sync-remote"], cwd=repo, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout.splitlines()

    first = stage_runner()
    assert first[-1] == RAN and any(line.startswith("prepared ") for line in first), first
    prepared, lock = _files(repo / "data" / "prepared"), (repo / "dvc.lock").read_text()
    metric = (repo / "metrics" / "prepare.json").read_bytes()
    assert "in sync" in _dvc(repo, "status", "--cloud", env=env)
    assert stage_runner()[-1] == UP_TO_DATE

    for lost in (repo / "data", repo / "metrics", repo / ".dvc" / "cache", repo / ".dvc" / "tmp"):
        shutil.rmtree(lost)
    (repo / "dvc.lock").unlink()
    restored = stage_runner()
    assert restored[-1] == RESTORED and not any(line.startswith("prepared ") for line in restored), restored
    assert _files(repo / "data" / "prepared") == prepared
    assert (repo / "metrics" / "prepare.json").read_bytes() == metric
    assert (repo / "dvc.lock").read_text() == lock
