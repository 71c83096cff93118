"""The MLflow UI over the pipeline's own store: what a user browses, checked through the server's REST API.

`mlflow server` (one worker, no job execution) runs over a copy of the tiny pipeline's sqlite store
and artifacts; the checks are what the README tells the user to look at: the experiment, eval
scores against tokens seen, the EVAL table artifact and the milestone checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse

import pytest
from pipeline_repo import clone_workspace
from servers import free_port, get_json, post_json, start, stop, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_ui(pipeline_repo, tmp_path_factory):
    root = clone_workspace(pipeline_repo.root, tmp_path_factory.mktemp("mlflow-ui") / "repo", outputs=False,
                           dvc_cache=False)
    for read_only in ("metrics", "models"):  # the run ids the stages recorded, the milestones they wrote
        (root / read_only).symlink_to(pipeline_repo.root / read_only)
    port = free_port()
    log = root.parent / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = start([sys.executable, "-m", "mlflow", "server",
                  "--backend-store-uri", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
                  "--default-artifact-root", str(root / "mlflow" / "artifacts"),
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log, cwd=root, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 240, proc, log)
        yield root, f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def _api(base: str, endpoint: str, **query) -> dict:
    return get_json(f"{base}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}")


def _pretrain_run(root, base) -> tuple[dict, dict]:
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    experiment = _api(base, "experiments/get-by-name", experiment_name=params["mlflow"]["experiment"])["experiment"]
    run_id = json.loads((root / "metrics" / "pretrain.json").read_text())["mlflow_run_id"]
    runs = post_json(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    (run,) = [r for r in runs if r["info"]["run_id"] == run_id]
    return experiment, run


def _artifact_paths(base: str, run_id: str, path: str = "", depth: int = 4) -> list[str]:
    listing = _api(base, "artifacts/list", run_id=run_id, **({"path": path} if path else {}))
    found = []
    for entry in listing.get("files", []):
        found.append(entry["path"])
        if entry["is_dir"] and depth > 0:
            found += _artifact_paths(base, run_id, entry["path"], depth - 1)
    return found


def test_experiment_and_pretrain_run_are_served(mlflow_ui):
    root, base = mlflow_ui
    experiment, run = _pretrain_run(root, base)
    assert experiment["lifecycle_stage"] == "active"
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert tags.get("mlflow.experimentKind") == "custom_model_development", "the UI would open its GenAI view"
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"].startswith("pretrain-tiny-"), "a name a person recognises: stage, profile, recipe"
    metric_keys = {m["key"] for m in run["data"]["metrics"]}
    assert "eval/avg" in metric_keys


def test_eval_history_is_score_against_tokens_seen(mlflow_ui):
    """The chart the README points at: eval/avg with step = tokens seen, one point per milestone."""
    root, base = mlflow_ui
    _, run = _pretrain_run(root, base)
    history = _api(base, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="eval/avg")["metrics"]
    evaluated = {name: m for name, m in json.loads((root / "metrics" / "eval.json").read_text()).items()
                 if isinstance(m, dict)}
    by_step = {int(point["step"]): point["value"] for point in history}
    assert set(by_step) == {int(m["tokens"]) for m in evaluated.values()}
    for milestone in evaluated.values():
        assert by_step[int(milestone["tokens"])] == pytest.approx(milestone["avg"], abs=1e-6)
    # ...charted while training ran: the milestone evals on Ray logged every point before the pretrain
    # run ended (`evaluate` only fills in milestones those evals missed, after it).
    late = [p for p in history if int(p["timestamp"]) > int(run["info"]["end_time"])]
    assert not late, f"eval/avg points logged after pretraining ended (evals during training failed?): {late}"


def test_eval_table_is_an_artifact(mlflow_ui):
    root, base = mlflow_ui
    _, run = _pretrain_run(root, base)
    paths = _artifact_paths(base, run["info"]["run_id"])
    assert any(p.endswith("eval_table.md") for p in paths), paths


def test_milestone_checkpoints_are_in_mlflow(mlflow_ui):
    """Each milestone dir is browsable: run artifacts holding its weights, or a registered model version of the run."""
    root, base = mlflow_ui
    _, run = _pretrain_run(root, base)
    run_id = run["info"]["run_id"]
    milestones = sorted(p.name for p in (root / "models" / "pretrain").iterdir() if (p / "model.safetensors").is_file())
    assert milestones
    artifacts = _artifact_paths(base, run_id)
    versions = _api(base, "model-versions/search", filter=f"run_id = '{run_id}'").get("model_versions", [])
    described = json.dumps(versions)
    missing = [m for m in milestones
               if not any(m in p.split("/") and p.endswith("model.safetensors") for p in artifacts)
               and m not in described]
    assert not missing, f"milestones not in MLflow (as artifacts or model versions): {missing}"
