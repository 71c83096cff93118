"""Milestone evals on Ray as they land: non-blocking, logged to the pretrain run at step = tokens
seen, cached for the `evaluate` stage, and a failure tags the run instead of raising."""

import shutil
import tempfile

import pytest
from eval_fixtures import ROOT, make_project

from tasks.evaluate.during_training import eval_resources, submit_milestone_eval
from tasks.evaluate.stage import evaluate
from tasks.params import load_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs and its own temp dir, shut down after the module."""
    import ray

    temp = tempfile.mkdtemp(prefix="ray-ev-", dir="/tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_eval_resources_follow_the_device():
    params = load_params(ROOT / "params.yaml")
    assert eval_resources(params) == {"num_cpus": 1, "num_gpus": 0}
    gpu = params.model_copy(update={"eval": params.eval.model_copy(update={"device": "cuda"})})
    assert eval_resources(gpu) == {"num_cpus": 1, "num_gpus": 1}


def test_milestone_evals_log_as_they_land_and_failures_only_tag(tmp_path, eval_models, ray_local, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = make_project(tmp_path, eval_models, f"sqlite:///{tmp_path / 'mlflow.db'}")
    params, run_id = load_params(project["params"]), project["run_id"]
    broken = tmp_path / "elsewhere" / "2K"
    shutil.copytree(project["root"] / "models" / "pretrain" / "1K", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")

    ok_ref = submit_milestone_eval(params, project["root"] / "models" / "pretrain" / "4K", run_id, 4096)
    bad_ref = submit_milestone_eval(params, broken, run_id, 2048)
    ready, _ = ray_local.wait([ok_ref], timeout=0)
    assert not ready, "submitting must return before the eval has run (it loads a model: seconds)"
    ok, bad = ray_local.get([ok_ref, bad_ref], timeout=600)

    assert ok["status"] == "ok" and ok["avg"] >= 0.9
    assert bad["status"] == "failed" and bad["milestone"] == "1K"  # the name comes from its config.json
    client = MlflowClient(tracking_uri=project["uri"])
    history = client.get_metric_history(run_id, "eval/avg")
    assert [(m.step, m.value) for m in history] == [(4096, ok["avg"])]
    tags = client.get_run(run_id).data.tags
    assert "eval_failed/1K" in tags and "safetensors" in tags["eval_failed/1K"].lower()
    assert "eval_failed/4K" not in tags

    # The stage then finds 4K already scored (same weights) and scores only 1K itself.
    results = {r["milestone"]: r for r in evaluate(params)}
    assert results["4K"]["cached"] and not results["1K"]["cached"]
    assert results["4K"]["avg"] == ok["avg"]
