"""prefect.yaml's deployments (fast) and the real thing (slow): services up, a deployment run, services down."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from pipeline_repo import clone_workspace, env_for
from servers import free_port, get_json, port_open, post_json

from flows.dag import load_stages
from flows.report import artifact_key

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = {"tiny-cpu", "tinyllama-1.1b-16gpu"}


def _prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_deployments_point_at_the_pipeline_flow_with_valid_parameters():
    from prefect.flows import load_flow_from_entrypoint

    from tasks.params import load_params

    deployments = {d["name"]: d for d in _prefect_yaml()["deployments"]}
    assert set(deployments) == DEPLOYMENTS
    pools = {d["work_pool"]["name"] for d in deployments.values()}
    assert len(pools) == 1, "both deployments use the one process work pool"
    for name, deployment in deployments.items():
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == "tinyllama-pipeline", f"{name}: deployment would be {flow.name}/{name}"
        flow.validate_parameters(deployment["parameters"])
        load_params(ROOT / deployment["parameters"]["params"])
    assert deployments["tinyllama-1.1b-16gpu"]["parameters"]["ray_address"] == "auto"
    assert deployments["tiny-cpu"]["parameters"]["params"] == "params.yaml"


def test_services_script_creates_a_process_pool_and_stops_by_process_group():
    script = (ROOT / "infra" / "local" / "services.sh").read_text()
    pool = _prefect_yaml()["deployments"][0]["work_pool"]["name"]
    assert f'POOL="${{PREFECT_POOL:-{pool}}}"' in script
    assert "--type process" in script and "kill -TERM -- \"-$pid\"" in script and "setsid" in script
    assert os.access(ROOT / "infra" / "local" / "services.sh", os.X_OK)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_deployment_run_through_local_services(pipeline_repo, tmp_path):
    """`services.sh start`, `prefect deployment run tinyllama-pipeline/tiny-cpu --watch`, `services.sh stop`.

    Runs on a copy of the finished tiny pipeline with one eval param changed, so the flow run does
    real work without retraining: DVC reruns evaluate and only evaluate (its params are its own), and
    every other stage reports itself up to date.
    """
    root = clone_workspace(pipeline_repo.root, tmp_path / "repo")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["eval"]["batch_size"] = max(1, params["eval"]["batch_size"] // 2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prefect_port, mlflow_port = free_port(), free_port()
    env = {**env_for(root), "PREFECT_PORT": str(prefect_port), "MLFLOW_PORT": str(mlflow_port),
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
    services = root / "infra" / "local" / "services.sh"
    try:
        started = subprocess.run([str(services), "start"], cwd=root, env=env, capture_output=True, text=True,
                                 timeout=900)
        assert started.returncode == 0, started.stdout + started.stderr
        pids = {p.stem: int(p.read_text()) for p in (root / ".services").glob("*.pid")}
        assert set(pids) == {"prefect-server", "prefect-worker", "mlflow-server"}

        run = subprocess.run([str(root / ".venv" / "bin" / "prefect"), "deployment", "run",
                              "tinyllama-pipeline/tiny-cpu", "--watch", "--watch-timeout", "1800"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=1900)
        assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
        assert "Completed" in run.stdout

        api = env["PREFECT_API_URL"]
        pool = get_json(f"{api}/work_pools/tinyllama-process")
        assert pool["type"] == "process"
        (flow_run,) = post_json(f"{api}/flow_runs/filter", {"deployments": {"name": {"any_": ["tiny-cpu"]}}})
        task_runs = post_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
        assert {t["name"] for t in task_runs} >= {"tokenizer", "prepare", "pretrain", "evaluate"}
        assert all(t["state"]["type"] == "COMPLETED" for t in task_runs)
        artifacts = post_json(f"{api}/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
        status = {a["key"]: a["data"].split("\n")[2] for a in artifacts if a["key"].endswith("-stage")}
        assert set(status) == {artifact_key(stage) for stage in load_stages(root)}, status
        assert [key for key, line in status.items() if line == "ran"] == ["evaluate-stage"], status

        mlflow = f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow"
        experiment = get_json(f"{mlflow}/experiments/get-by-name?experiment_name={params['mlflow']['experiment']}")
        runs = post_json(f"{mlflow}/runs/search",
                         {"experiment_ids": [experiment["experiment"]["experiment_id"]]})["runs"]
        run_id = json.loads((root / "metrics" / "pretrain.json").read_text())["mlflow_run_id"]
        assert run_id in {r["info"]["run_id"] for r in runs}
        assert json.loads((root / "metrics" / "eval.json").read_text())
    finally:
        stopped = subprocess.run([str(services), "stop"], cwd=root, env=env, capture_output=True, text=True,
                                 timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not list((root / ".services").glob("*.pid"))
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert not port_open(prefect_port) and not port_open(mlflow_port)
