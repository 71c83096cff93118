"""`prepare` on a multi-node rehearsal cluster, reading S3 through faults, killed and rerun.

A Ray cluster of a CPU-less head and two one-CPU "prepare" nodes (`ray.cluster_utils`, as
tests/test_cluster_rehearsal.py), SlimPajama- and Starcoderdata-layout sources on moto's S3 server,
reached through a proxy that answers some object reads with a 503, a reset connection mid-body or a
stall. During one run a tokenizer worker is SIGKILLed, then the driver; the rerun keeps what was
sealed and must write the very bytes of an uninterrupted one-worker run on the stage's own Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from data_fixtures import ROOT, write_params, write_slimpajama, write_starcoderdata
from fault_proxy import FaultProxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """The driver's environment for the cluster: its address and the auth mode its nodes started with.
    The mode must be passed on: the reference run's local `ray.init` switches this process to token auth
    (Ray's default for a new local cluster), and a driver in token mode rejects a tokenless cluster's
    calls ("InvalidAuthToken"), which shows as tokenizer actors cancelled before they start."""
    from ray.cluster_utils import Cluster

    auth_mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"prepare": 1})
    cluster.wait_for_nodes()
    yield {"RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": auth_mode}
    cluster.shutdown()


def _upload(tmp_path: Path, bucket: str) -> list[dict]:
    import s3fs

    write_slimpajama(tmp_path / "raw" / "sp", chunks=2, files_per_chunk=3, rows_per_file=400)
    write_starcoderdata(tmp_path / "raw" / "sc", languages=("python", "rust"), files=2, rows_per_file=300)
    fs = s3fs.S3FileSystem()
    fs.mkdir(bucket)
    fs.put(str(tmp_path / "raw") + "/", f"{bucket}/raw/", recursive=True)
    return [{"name": "slimpajama", "format": "slimpajama", "uri": f"s3://{bucket}/raw/sp/train/**/*.jsonl.zst",
             "weight": 0.7},
            {"name": "starcoderdata", "format": "starcoderdata", "uri": f"s3://{bucket}/raw/sc", "weight": 0.3}]


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _workspace(root: Path, tokenizer_dir, sources, **data) -> Path:
    import shutil

    shutil.copytree(tokenizer_dir, root / "models" / "tokenizer")
    return write_params(root, sources, seq_len=32, rows_per_shard=64, row_group_rows=16, val_fraction=0.05, **data)


def _tokenizer_workers():
    """Ray Data's tokenizer actors on the machine, the shared pipeline run's excepted (it runs beside this)."""
    import psutil
    from pipeline_repo import background_pids

    found, shared_run = [], background_pids()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.pid not in shared_run and any("MapWorker" in part and "UnitEncoder" in part for part in cmdline):
            found.append(process)
    return found


def _under_way(units: Path) -> bool:
    """A part of some unit has reached the driver: the tokenizer actors are running tasks."""
    return units.is_dir() and any(path.is_file() for path in units.rglob("*"))


def test_killed_workers_and_driver_and_faulty_s3_give_the_one_worker_bytes(
        tmp_path, s3_env, cluster, small_tokenizer_dir, monkeypatch):
    from tasks.cli import main as cli

    sources = _upload(tmp_path, f"prep-{uuid.uuid4().hex[:10]}")
    reference = _workspace(tmp_path / "reference", small_tokenizer_dir, sources, encode_processes=1)
    assert cli(["prepare", "--params", str(reference)]) == 0  # the stage's own Ray, straight to S3
    expected = _files(tmp_path / "reference" / "data" / "prepared")

    workspace = tmp_path / "workspace"
    params_file = _workspace(workspace, small_tokenizer_dir, sources, encode_processes=2,
                             resources_per_worker={"prepare": 1})
    units = workspace / "data" / ".prepare.tmp" / "units"
    with FaultProxy(s3_env, every=4) as proxy:
        env = {**os.environ, **cluster, "AWS_ENDPOINT_URL": proxy.url,
               "TINYLLAMA_DRIVER_WORKSPACE": str(workspace), "RAY_RUNTIME_ENV_HOOK":
               "rehearsal_hooks.forbid_driver_workspace",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        log = workspace / "driver.log"
        with open(log, "wb") as out:
            driver = subprocess.Popen([sys.executable, "-m", "tasks.cli", "prepare", "--params", str(params_file)],
                                      cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not _under_way(units) and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            victims = _tokenizer_workers()
            assert victims, f"no tokenizer worker started: {log.read_text()[-2000:]}"
            victims[0].send_signal(signal.SIGKILL)  # Ray restarts the actor and retries its unit
            while len(list(units.rglob("*.json"))) < 3 and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert driver.poll() is None, f"the run ended before the driver was killed: {log.read_text()[-2000:]}"
            os.killpg(driver.pid, signal.SIGKILL)
        finally:
            driver.wait()
        sealed_before = {p.name for p in units.rglob("*.json")}
        killed_run = (workspace / "logs" / "prepare.log").read_text()
        assert "tokenizing failed" not in killed_run, f"Ray did not retry the killed worker's task: {killed_run}"
        assert not (workspace / "data" / "prepared").exists()

        rerun = subprocess.run([sys.executable, "-m", "tasks.cli", "prepare", "--params", str(params_file)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"{len(sealed_before)} of 10 inputs already tokenized" in rerun.stdout
    assert sum(proxy.faults.values()) >= 2, proxy.faults
    assert _files(workspace / "data" / "prepared") == expected
    manifest = json.loads((workspace / "data" / "prepared" / "manifest.json").read_text())
    assert len(manifest["sources"]["slimpajama"]["inputs"]) == 6
