"""A rehearsal of the 16-GPU recipe's cluster mechanics on this machine, at tiny scale.

What differs from the tiny profile is everything a multi-node cluster changes, and each of the cluster
profile's known failure modes would fail it:
- a Ray cluster of several nodes (`ray.cluster_utils.Cluster`): two "trainer" nodes for 4 FSDP2 workers
  on a 2 × 2 HSDP mesh (`train.mesh`, as the 1.1B profile's 2 × 8)
  over gloo and one "evaluator" node (two slots) for milestone evals, each kind reached through custom resources
  (`train.resources_per_worker`, `eval.resources`) and checked together before training starts: a
  cluster without room for the evals fails before training, naming what is missing;
- shared storage only: the prepared shards (content-addressed, `paths.shared`), the run's checkpoints
  and milestones (`train.checkpoint_dir`) and the eval score cache on S3 (moto's server), MLflow over
  HTTP; every Ray worker of the job refuses to open or list anything under the driver's workspace
  (tests/rehearsal_hooks.py), as a worker on another node could not;
- faults: the driver killed after its second milestone, the newest checkpoint then corrupted on S3, the
  stage rerun, and during that rerun a training worker SIGKILLed after a checkpoint. Every milestone must
  be published, and the final weights must equal an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from conftest import point_at_s3, pretrain_params, time_limit, train_worker_processes
from safetensors.torch import load_file
from servers import free_port, start, stop, wait_http

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MILESTONES = ["4K", "8K", "16K", "24K"]


@pytest.fixture(scope="module")
def cluster():
    """A head (no CPUs: the driver's), two trainer nodes, one evaluator node with room for two milestone
    evals at once (with one, the run's evals queued ~60 s after its last step); its address."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_port": free_port()})
    for _ in range(2):
        cluster.add_node(num_cpus=2, resources={"trainer": 2})
    cluster.add_node(num_cpus=2, resources={"evaluator": 2})
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """An MLflow tracking server over HTTP (artifacts proxied), as on a cluster: no worker writes a file of it."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                  "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1"], root / "server.log", env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 240, proc, root / "server.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def _params_file(workspace: Path, bucket: str, runs: str, **train) -> Path:
    # HSDP as the 1.1B profile runs it: 2 "nodes" (replicas) × 2 workers sharding within each.
    settings = dict(strategy="fsdp", mesh={"replicate": 2, "shard": 2}, workers=4, global_batch_tokens=1024,
                    micro_batch=2, total_tokens=24 * 1024,
                    milestones=[4000, 8000, 16000, 24000], checkpoint_every_steps=4, keep_checkpoints=3,
                    eval_milestones_during_training=True, max_failures=1, checkpoint_dir=f"s3://{bucket}/{runs}",
                    resources_per_worker={"trainer": 1}, resource_timeout_s=60)
    params = pretrain_params(workspace, **{**settings, **train})
    raw = params.model_dump(mode="json")
    raw["paths"]["shared"] = f"s3://{bucket}/shared"
    raw["eval"].update(resources={"CPU": 1, "evaluator": 1}, batch_size=8, perplexity_rows=16, timeout_s=600)
    path = workspace / f"params-{runs}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path



def _s3():
    import s3fs

    return s3fs.S3FileSystem(use_listings_cache=False)  # the stage writes there from other processes


def _sealed(run_root: str, name: str) -> bool:
    return bool(_s3().glob(f"{run_root}/run-*/milestones/{name}/milestone.json"))


def _checkpoints(run_root: str) -> list[str]:
    return sorted(p for p in _s3().glob(f"{run_root}/run-*/checkpoint_*") if _s3().exists(f"{p}/checkpoint.json"))


def _weights(workspace: Path) -> dict[str, torch.Tensor]:
    return load_file(str(workspace / "models" / "pretrain" / MILESTONES[-1] / "model.safetensors"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, s3_server, cluster, mlflow_server):
    """The driver's workspace (tokenizer and prepared manifest local, shards on S3), made once for the
    module (each test trains under its own run name), and the job's environment: the cluster, the
    tracking server, workers that may not touch this dir."""
    import s3fs

    from tasks.cli import main as cli

    with pytest.MonkeyPatch.context() as monkeypatch:
        point_at_s3(monkeypatch, s3_server)
        bucket = f"rehearsal-{uuid.uuid4().hex[:10]}"
        _s3().mkdir(bucket)
        workspace = tmp_path_factory.mktemp("rehearsal") / "workspace"
        workspace.mkdir()
        for name, value in {"RAY_ADDRESS": cluster, "MLFLOW_TRACKING_URI": mlflow_server,
                            "TINYLLAMA_DRIVER_WORKSPACE": str(workspace), "RAY_RUNTIME_ENV_HOOK":
                            "rehearsal_hooks.forbid_driver_workspace", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}.items():
            monkeypatch.setenv(name, value)
        setup = _params_file(workspace, bucket, "setup")
        with time_limit(600, "the rehearsal's tokenizer and prepare stages"):
            assert cli(["tokenizer", "--params", str(setup)]) == 0
            assert cli(["prepare", "--params", str(setup)]) == 0
        assert sorted(p.name for p in (workspace / "data" / "prepared").iterdir()) == ["manifest.json"]
        yield workspace, bucket
    s3fs.S3FileSystem.clear_instance_cache()


def test_workers_may_not_touch_the_driver_workspace(workspace):
    """The guard itself: a Ray task of the job that reads the driver's workspace fails; one that reads S3 works."""
    import ray

    from tasks.params import load_params
    from tasks.ray_cluster import ray_session

    root, bucket = workspace
    params = load_params(_params_file(root, bucket, "guard"))
    manifest = root / "data" / "prepared" / "manifest.json"
    with ray_session(params, "guard"):
        reads = ray.remote(num_cpus=1)(lambda path: open(path, "rb").read()[:1])
        with pytest.raises(Exception, match="touched the driver's local path"):
            ray.get(reads.remote(str(manifest)), timeout=120)
        fetch = ray.remote(num_cpus=1)(lambda uri: __import__("tasks.files").files.exists(uri))
        assert ray.get(fetch.remote(f"s3://{bucket}/shared/shards"), timeout=120)


def test_a_cluster_without_room_for_the_evals_fails_before_training(workspace):
    from tasks.errors import UserError
    from tasks.params import load_params
    from tasks.pretrain.stage import pretrain

    root, bucket = workspace
    params = load_params(_params_file(root, bucket, "too-big", resource_timeout_s=1))
    params.eval.resources["evaluator"] = 3  # the cluster has two evaluator slots
    with pytest.raises(UserError, match=r"lacks evaluator 3 \(has 2\) .* \+ eval.resources"):
        pretrain(params)
    assert not _s3().glob(f"{bucket}/too-big/run-*/checkpoint_*")


@pytest.mark.timeout(1500)
def test_faults_on_shared_storage_end_in_the_uninterrupted_weights(workspace):
    from tasks.params import load_params
    from tasks.pretrain.stage import pretrain

    root, bucket = workspace
    pretrain(load_params(_params_file(root, bucket, "reference")))
    reference = _weights(root)

    # 1. The driver dies after its second milestone's checkpoint (its export, a Ray task, may die with it).
    params_file = _params_file(root, bucket, "runs")
    driver = subprocess.Popen([sys.executable, "-m", "tasks.cli", "pretrain", "--params", str(params_file)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while len(_checkpoints(f"{bucket}/runs")) < 2 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    finished = any(p.endswith("checkpoint_0000000024") for p in _checkpoints(f"{bucket}/runs"))
    assert driver.poll() is None and not finished, "the run ended before the kill"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    # 2. Its newest checkpoint is corrupted on S3 (a shard cut short).
    newest = _checkpoints(f"{bucket}/runs")[-1]
    shard = sorted(_s3().glob(f"{newest}/shards/*.safetensors"))[0]
    _s3().pipe_file(shard, _s3().cat_file(shard)[:100])

    # 3. The rerun resumes from the checkpoint before it, and loses a worker after its next checkpoint.
    before = set(_checkpoints(f"{bucket}/runs"))
    killed = []

    def kill_a_worker():
        while time.monotonic() < deadline and not set(_checkpoints(f"{bucket}/runs")) - before:
            time.sleep(0.2)
        workers = train_worker_processes()
        if workers:
            workers[-1].send_signal(signal.SIGKILL)
            killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    metrics = pretrain(load_params(params_file))
    killer.join(timeout=60)
    assert killed, "no training worker was killed"
    assert metrics["steps"] == 24
    assert _s3().glob(f"{bucket}/runs/run-*/corrupt-checkpoint_*"), "the corrupt checkpoint was set aside"
    assert sorted(p.name for p in (root / "models" / "pretrain").iterdir()) == sorted(MILESTONES)
    final = _weights(root)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k])
               for k in final), "the final weights differ from the uninterrupted run's"
    assert len(_s3().ls(f"{bucket}/shared/eval_cache")) >= len(MILESTONES), "milestone evals ran on the evaluator node"
