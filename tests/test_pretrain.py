"""The pretrain stage end to end on a local Ray: training, milestones, MLflow, metrics, bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import pretrain_params
from tasks.errors import UserError
from tasks.pretrain.stage import pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


@pytest.mark.slow
def test_pretrain_learns_exports_milestones_and_logs(pretrain_workspace, local_ray, capsys):
    from mlflow.tracking import MlflowClient

    from model.hf import load_hf, read_hf_config

    params, root = pretrain_workspace
    metrics = pretrain(params)

    written = json.loads((root / "metrics" / "pretrain.json").read_text())
    assert written == metrics
    assert set(written) == {"mlflow_run_id", "final_train_loss", "final_val_loss", "tokens", "steps",
                            "wall_time_s", "tokens_per_s"}
    assert (written["steps"], written["tokens"]) == (24, 24 * 1024)
    chance = math.log(512)
    assert written["final_val_loss"] < chance - 1.0  # the arithmetic-sequence fixture is learnable
    assert written["tokens_per_s"] > 0 and written["wall_time_s"] > 0

    for name, step in (("5.12K", 5), ("24.576K", 24)):
        directory = root / "models" / "pretrain" / name
        meta = read_hf_config(directory)["tinyllama"]
        assert meta == {"milestone": name, "milestone_tokens": step * 1024, "tokens_seen": step * 1024, "step": step}
        assert (directory / "tokenizer.model").read_bytes() == (root / "models" / "tokenizer" / "tokenizer.model").read_bytes()
    early = load_hf(root / "models" / "pretrain" / "5.12K")
    late = load_hf(root / "models" / "pretrain" / "24.576K")
    val = torch.tensor([[(7 + i) % 512 for i in range(65)]])  # an unseen alpha-like row
    with torch.no_grad():
        assert late.loss(val) < early.loss(val)

    client = MlflowClient()
    run = client.get_run(written["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.preset"] == "micro"
    assert run.data.params["derived.grad_accum"] == "2"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, 25)), key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [8, 16, 24]
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    for name in ("5.12K", "24.576K"):  # each milestone's HF dir is browsable in the run's artifacts
        logged = {a.path for a in client.list_artifacts(run.info.run_id, f"checkpoints/{name}")}
        assert f"checkpoints/{name}/model.safetensors" in logged and f"checkpoints/{name}/config.json" in logged
    assert losses[-1] < losses[0] - 1.0

    run_dirs = list((root / "checkpoints").iterdir())
    assert len(run_dirs) == 1
    kept = sorted(p.name for p in run_dirs[0].iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert kept == ["checkpoint_0000000018", "checkpoint_0000000024"]  # keep_checkpoints: 2
    assert "step 24/24 | tokens 24.576K/24.576K | loss" in capsys.readouterr().out


def test_a_cluster_that_cannot_host_training_and_its_evals_fails_before_training(pretrain_workspace, local_ray):
    """Training workers and a milestone eval are reserved together, with a limit on the wait; the error
    says what is missing and which params ask for it (the local cluster has 2 CPUs)."""
    _, root = pretrain_workspace
    params = pretrain_params(root, workers=4, global_batch_tokens=2048, resource_timeout_s=1)
    with pytest.raises(UserError, match=r"train.workers: the Ray cluster lacks CPU 4 \(has 2\) for train.workers 4"):
        pretrain(params)
    with_evals = pretrain_params(root, eval_milestones_during_training=True, resource_timeout_s=1)
    with pytest.raises(UserError, match=r"lacks CPU 3 \(has 2\) .* \+ eval.resources .*waited 1 s"):
        pretrain(with_evals)
    assert not (root / "checkpoints").exists() and not (root / "metrics").exists()


def test_cli_missing_prepared_data_exits_2_and_writes_nothing(tmp_path):
    params = pretrain_params(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    result = subprocess.run([sys.executable, "-m", "tasks.cli", "pretrain", "--params", str(path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("tinyllama pretrain: error: paths.data: no prepared data at")
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "params.yaml"]  # only its own log file
