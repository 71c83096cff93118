"""Milestone evals on Ray as they land: non-blocking, logged to the pretrain run at step = tokens
seen, cached for the `evaluate` stage, and a failure tags the run instead of raising."""

import json
import shutil

import pytest
from eval_fixtures import ROOT, make_project

from tasks.evaluate.during_training import eval_resources, submit_milestone_eval
from tasks.evaluate.scoring import collect_inputs
from tasks.evaluate.stage import evaluate
from tasks.files import seal_record
from tasks.layout import MILESTONE_SEAL
from tasks.params import load_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_eval_resources_come_from_the_profile():
    params = load_params(ROOT / "params.yaml")
    assert eval_resources(params) == {"num_cpus": 1, "num_gpus": 0}
    cluster = load_params(ROOT / "configs" / "tinyllama-1.1b.yaml")
    assert eval_resources(cluster) == {"num_cpus": 8, "num_gpus": 1, "resources": {"evaluator": 1}}


def test_milestone_evals_log_as_they_land_and_failures_only_tag(tmp_path, eval_models, local_ray, monkeypatch):
    import ray
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = make_project(tmp_path, eval_models, f"sqlite:///{tmp_path / 'mlflow.db'}")
    params, run_id = load_params(project["params"]), project["run_id"]
    # Milestones as pretraining publishes them in its run's dir: sealed (every file's sha256, written last).
    sealed = tmp_path / "run" / "milestones"
    shutil.copytree(project["root"] / "models" / "pretrain" / "4K", sealed / "4K")
    broken = sealed / "2K"
    shutil.copytree(project["root"] / "models" / "pretrain" / "1K", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    for milestone in (sealed / "4K", broken):
        (milestone / MILESTONE_SEAL).write_text(json.dumps(seal_record(milestone)))

    inputs = collect_inputs(params)
    ok_ref = submit_milestone_eval(params, inputs, sealed / "4K", run_id, 4096, project["uri"])
    bad_ref = submit_milestone_eval(params, inputs, broken, run_id, 2048, project["uri"])
    ready, _ = ray.wait([ok_ref], timeout=0)
    assert not ready, "submitting must return before the eval has run (it loads a model: seconds)"
    ok, bad = ray.get([ok_ref, bad_ref], timeout=600)

    assert ok["status"] == "ok" and ok["avg"] >= 0.9
    assert bad["status"] == "failed" and bad["milestone"] == "1K"  # the name comes from its config.json
    client = MlflowClient(tracking_uri=project["uri"])
    history = client.get_metric_history(run_id, "eval/avg")
    assert [(m.step, m.value) for m in history] == [(4096, ok["avg"])]
    tags = client.get_run(run_id).data.tags
    assert "eval_failed/1K" in tags and "safetensors" in tags["eval_failed/1K"].lower()
    assert "eval_failed/4K" not in tags

    # A rerun after a fault exports 4K again: its scores are cached, so no task starts (none would be done
    # at once: it loads a model) and the scores are logged again at the same step.
    again = submit_milestone_eval(params, inputs, sealed / "4K", run_id, 4096, project["uri"])
    ready, _ = ray.wait([again], timeout=0)
    assert ready, "cached scores must not wait for an eval task"
    assert ray.get(again)["cached"] and ray.get(again)["avg"] == ok["avg"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/avg")] == [(4096, ok["avg"])] * 2

    # The stage then finds 4K already scored (same weights) and scores only 1K itself.
    results = {r["milestone"]: r for r in evaluate(params)}
    assert results["4K"]["cached"] and not results["1K"]["cached"]
    assert results["4K"]["avg"] == ok["avg"]
