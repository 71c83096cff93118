"""How stages start Ray (tasks/ray_cluster.py): the job's runtime env reaches every worker, the State API
answers (Ray Train's placement-group cleaner polls it every second and warns each time it cannot), workers'
lines reach the stage's console through a queue, and the session's logs are kept under logs/."""

from __future__ import annotations

import os
import shutil

import yaml
from conftest import pretrain_params


def test_a_local_session_carries_worker_env_state_api_console_and_logs(tmp_path, capsys):
    import ray
    from ray.util.state import list_nodes

    from tasks.ray_cluster import console_relay, ray_session

    assert not ray.is_initialized()
    params = pretrain_params(tmp_path, worker_env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"})
    with ray_session(params, "probe"), console_relay() as console:
        env = ray.get(ray.remote(num_cpus=1)(lambda: {k: os.environ.get(k) for k in
                                                       ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TQDM_DISABLE")}).remote())
        assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TQDM_DISABLE": "1"}
        dashboard = ray._private.worker.get_dashboard_url()
        assert len(list_nodes(address=f"http://{dashboard}")) == 1, "the State API answers"
        ray.get(ray.remote(num_cpus=1)(lambda c: c.say("hello from a worker")).remote(console))
    assert not ray.is_initialized()
    assert "hello from a worker" in capsys.readouterr().out
    logs = tmp_path / "logs" / "probe-ray"
    assert any(p.name.startswith("worker-") for p in logs.iterdir()), "the workers' own output is kept"
    assert any("hello from a worker" in p.read_text(errors="replace") for p in logs.glob("worker-*.out"))


def test_the_cluster_profile_gives_its_workers_nccl_error_handling():
    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tinyllama-1.1b.yaml").read_text())
    assert raw["train"]["worker_env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] in ("1", "3")
    prefect = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    assert all("TORCH_NCCL" not in str(d["work_pool"]["job_variables"]) for d in prefect["deployments"]), \
        "worker env belongs in the Ray job's runtime env, not only the Prefect worker's"


def test_ray_is_sized_by_the_cores_this_process_may_use():
    """A process pinned to one core (taskset, a container's cpuset) gets a one-CPU Ray, whatever the host has."""
    from tasks.ray_cluster import usable_cpus

    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert 1 <= usable_cpus() <= len(allowed)


def test_a_local_session_stays_local_when_ray_address_names_a_cluster(monkeypatch):
    """The deploy stage's gate serves on this machine's own Ray even in a stage run against a cluster (the flow
    sets RAY_ADDRESS for every stage): its `serve deploy` goes to that Ray's dashboard on 127.0.0.1."""
    import ray
    from ray.cluster_utils import Cluster

    from tasks.ray_cluster import free_port, start_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    temp_dir = None
    try:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        temp_dir = start_ray(1, dashboard_port=free_port(), local=True)
        assert temp_dir is not None
        assert ray.get_runtime_context().gcs_address != cluster.address
        assert ray.cluster_resources().get("CPU") == 1, "this machine's one-CPU Ray, not the 0-CPU cluster"
    finally:
        ray.shutdown()
        cluster.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
