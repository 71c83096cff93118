"""The Prefect pipeline flow over DVC: stage list from dvc.yaml, order, logs, retries, artifacts.

The machinery is exercised on a three-stage DVC project whose commands are small shell scripts
(the real stages take minutes; the slow end-to-end run is in tests/test_deployment.py), with
real DVC, a real MLflow store and Prefect's own ephemeral test server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.dag import load_stages

ROOT = Path(__file__).resolve().parents[1]

TOY_DVC_YAML = """
stages:
  first:
    cmd: sh first.sh
    deps: [first.sh]
    params: [seed]
    outs:
      - ${paths.data}/first.txt
  second:
    cmd: sh second.sh
    deps:
      - second.sh
      - run.json
      - ${paths.data}/first.txt
    params: [eval.batch_size]
    outs:
      - ${paths.metrics}/table.md:
          cache: false
    metrics:
      - ${paths.metrics}/second.json:
          cache: false
  third:
    cmd: sh third.sh
    deps:
      - third.sh
      - ${paths.metrics}/second.json
    outs:
      - ${paths.data}/third.txt
"""

SCRIPTS = {
    "first.sh": "echo hello from first\nmkdir -p data && echo one > data/first.txt\n",
    # Fails once (a crash: exit 1), then succeeds: the task's retry must absorb it.
    "second.sh": ("if [ ! -f .second-tried ]; then touch .second-tried; echo transient crash; exit 1; fi\n"
                  "if [ -f .second-bad-input ]; then echo 'second: error: eval.batch_size: bad'; exit 2; fi\n"
                  "mkdir -p metrics && cp run.json metrics/second.json\n"
                  "printf '| task | acc |\\n|---|---|\\n| toy | 0.5 |\\n' > metrics/table.md\n"),
    "third.sh": "echo hello from third\ncat metrics/second.json > data/third.txt\n",
}


def _toy_repo(path: Path) -> Path:
    """A DVC project (no git) with the real params.yaml and three shell-script stages."""
    path.mkdir()
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")
    (path / "dvc.yaml").write_text(TOY_DVC_YAML)
    for name, text in SCRIPTS.items():
        (path / name).write_text(text)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=path, check=True)
    return path


def _mlflow_run(root: Path) -> tuple[str, str]:
    """A real run in the toy's local store; its id goes into the toy's metrics like pretrain's does."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    experiment_id = client.create_experiment("toy", artifact_location=(root / "mlflow" / "artifacts").as_uri())
    run = client.create_run(experiment_id)
    client.set_terminated(run.info.run_id)
    (root / "run.json").write_text(json.dumps({"mlflow_run_id": run.info.run_id, "loss": 1.25}))
    return experiment_id, run.info.run_id


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """Prefect's ephemeral test server on a throwaway database and PREFECT_HOME."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC)
    return runs


def _logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def _artifacts(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in artifacts}


def _run(params: str = "params.yaml"):
    from flows.pipeline import pipeline

    state = pipeline(params=params, return_state=True)
    return state, state.state_details.flow_run_id


def test_flow_stages_are_exactly_dvc_stages_in_dependency_order():
    """The drift guard: the flow's task list is dvc.yaml's stages, each after what it needs (per DVC)."""
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    dot = subprocess.run([sys.executable, "-m", "dvc", "dag", "--dot"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    edges = re.findall(r'"(\w[\w-]*)" -> "(\w[\w-]*)"', dot)
    order = [stage.name for stage in load_stages(ROOT)]
    assert sorted(order) == sorted(listed)
    assert edges, f"dvc dag printed no edges:\n{dot}"
    for upstream, downstream in edges:
        assert order.index(upstream) < order.index(downstream), f"{downstream} would run before {upstream}"
    assert order[:4] == ["tokenizer", "prepare", "pretrain", "evaluate"]


def test_flow_runs_each_dvc_stage_as_a_task_with_logs_retries_and_artifacts(tmp_path, monkeypatch, prefect_server):
    root = _toy_repo(tmp_path / "toy")
    experiment_id, run_id = _mlflow_run(root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    state, flow_run_id = _run()
    assert state.is_completed(), state.message
    results = state.result()
    assert [r.name for r in results] == ["first", "second", "third"]
    assert all(r.ran for r in results)

    task_runs = _task_runs(flow_run_id)
    assert [t.name for t in task_runs] == ["first", "second", "third"]
    second = task_runs[1]
    assert second.run_count == 2, "the crashed stage should have been retried once"
    assert all(t.state.is_completed() for t in task_runs)

    logs = _logs(flow_run_id)
    assert "hello from first" in logs and "hello from third" in logs
    assert "transient crash" in logs
    assert "$ dvc repro --single-item second" in logs

    artifacts = _artifacts(flow_run_id)
    assert set(artifacts) == {"first-stage", "second-stage", "third-stage"}
    second_md = artifacts["second-stage"]
    assert "| loss | 1.25 |" in second_md                      # the DVC metrics, as a table
    assert "| toy | 0.5 |" in second_md                       # the markdown output, as written
    assert f"#/experiments/{experiment_id}/runs/{run_id}" in second_md  # link to the MLflow run

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"first", "second", "third"}

    again, again_id = _run()
    assert again.is_completed()
    assert [r.ran for r in again.result()] == [False, False, False], "a second run must be a no-op"
    assert "up to date" in _artifacts(again_id)["first-stage"]


def test_bad_params_stop_the_flow_before_any_stage(tmp_path, monkeypatch, prefect_server):
    from tasks.errors import UserError

    root = _toy_repo(tmp_path / "toy")
    bad = yaml.safe_load((root / "params.yaml").read_text())
    bad["train"]["lr"] = -1
    bad["eval"]["batch_size"] = "many"
    (root / "bad.yaml").write_text(yaml.safe_dump(bad))
    before = (root / "params.yaml").read_bytes()
    monkeypatch.chdir(root)

    state, flow_run_id = _run("bad.yaml")
    assert state.is_failed()
    with pytest.raises(UserError) as error:
        state.result()
    assert "train.lr" in str(error.value) and "eval.batch_size" in str(error.value)
    assert _task_runs(flow_run_id) == []
    assert (root / "params.yaml").read_bytes() == before
    assert not (root / "dvc.lock").exists() and not (root / "data").exists()


def test_cli_reports_bad_params_in_one_line_with_exit_2(tmp_path):
    root = _toy_repo(tmp_path / "toy")
    (root / "bad.yaml").write_text("seed: 1\ntrain: {lr: oops}\n")
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", "bad.yaml"], cwd=root,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": ""})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lr" in lines[0] and "data: required field is missing" in lines[0]
    assert not (root / "dvc.lock").exists()


def test_a_cluster_run_without_a_shared_mlflow_or_storage_stops_in_one_line_with_exit_2(tmp_path):
    """On a cluster (--ray-address) milestone evals log from other nodes: the local sqlite default is refused
    before anything starts; a tracking server is accepted. So is a profile without shared storage."""
    from flows.pipeline import check_cluster_profile
    from tasks.errors import UserError
    from tasks.params import MlflowParams, load_params

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    profile = str(ROOT / "configs/tinyllama-1.1b.yaml")
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", profile, "--ray-address", "auto"],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": ""}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("pipeline: error: mlflow.tracking_uri: sqlite:///") and "MLFLOW_TRACKING_URI" in line
    assert list(tmp_path.iterdir()) == [], "nothing written"
    params = load_params(ROOT / "configs/tinyllama-1.1b.yaml").model_copy(
        update={"mlflow": MlflowParams(tracking_uri="http://mlflow.internal:5000")})
    check_cluster_profile(params, "auto")
    check_cluster_profile(load_params(ROOT / "params.yaml"), None)  # the tiny profile's local store
    raw = params.model_dump(mode="json")
    raw["paths"]["shared"] = None
    with pytest.raises(UserError, match=r"^paths\.shared: .*every node"):
        check_cluster_profile(type(params).model_validate(raw), "auto")


def test_another_profile_becomes_params_yaml_byte_for_byte_and_params_yaml_stays_as_is(tmp_path, capsys):
    from flows.pipeline import ACTIVE_PARAMS, activate_params
    from tasks.params import load_params

    profile_file = ROOT / "configs" / "tinyllama-1.1b.yaml"
    (tmp_path / ACTIVE_PARAMS).write_bytes((ROOT / "params.yaml").read_bytes())
    activate_params(profile_file, load_params(profile_file), tmp_path)
    assert (tmp_path / ACTIVE_PARAMS).read_bytes() == profile_file.read_bytes()
    assert f"is now {ACTIVE_PARAMS}" in capsys.readouterr().out
    activate_params(tmp_path / ACTIVE_PARAMS, load_params(tmp_path / ACTIVE_PARAMS), tmp_path)
    assert capsys.readouterr().out == "" and (tmp_path / ACTIVE_PARAMS).read_bytes() == profile_file.read_bytes()


def test_a_cluster_run_syncs_stages_with_the_default_dvc_remote_and_warns_without_one(tmp_path, capsys):
    """Only a cluster run syncs each stage with DVC's remote (a local run keeps its cache to itself); the image's
    .dvc/config.local names one, and a cluster run in a repo without one is told what losing the head costs."""
    from flows.pipeline import syncs_with_dvc_remote

    repo = tmp_path / "repo"
    repo.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q", "--no-scm"], cwd=repo, check=True, timeout=120)
    assert not syncs_with_dvc_remote(repo, None)
    assert capsys.readouterr().out == ""
    assert not syncs_with_dvc_remote(repo, "auto")
    assert "warning: no default DVC remote" in capsys.readouterr().out
    shutil.copy2(ROOT / "infra" / "docker" / "dvc-config.local", repo / ".dvc" / "config.local")
    assert syncs_with_dvc_remote(repo, "auto")
    assert capsys.readouterr().out == ""


def test_bad_input_is_not_retried_and_the_next_run_resumes_from_the_failed_stage(tmp_path, monkeypatch, prefect_server):
    root = _toy_repo(tmp_path / "toy")
    _mlflow_run(root)
    (root / ".second-tried").touch()      # skip the transient crash: this time the stage's input is bad
    (root / ".second-bad-input").touch()
    monkeypatch.chdir(root)

    state, flow_run_id = _run()
    assert state.is_failed()
    task_runs = _task_runs(flow_run_id)
    assert [t.name for t in task_runs] == ["first", "second"], "nothing may run after a failed stage"
    assert task_runs[1].run_count == 1, "exit 2 (bad input) must not be retried"
    assert "exited 2" in (task_runs[1].state.message or "")
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"first"}, "DVC must record only the stage that finished"

    (root / ".second-bad-input").unlink()
    resumed, _ = _run()
    assert resumed.is_completed()
    assert [(r.name, r.ran) for r in resumed.result()] == [("first", False), ("second", True), ("third", True)]


def test_make_run_on_the_toy_stages_prints_no_traceback_and_no_repeated_lines(tmp_path):
    """The real entry point (`python -m flows.pipeline`, a throwaway Prefect server in a fresh PREFECT_HOME),
    as `make run` starts it: its console is for people."""
    from console import problems

    root = _toy_repo(tmp_path / "toy")
    _mlflow_run(root)
    (root / ".second-tried").touch()  # a clean run: no transient crash to retry
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PYTHONUNBUFFERED": "1"}
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml"], cwd=root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout
    found = problems(proc.stdout, max_lines=60)
    assert not found, "\n\n".join(found) + f"\n\n--- output\n{proc.stdout}"
    assert "hello from first" in proc.stdout and "Pipeline finished: first" in proc.stdout
