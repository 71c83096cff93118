"""The pretrain stage's refusals on a local Ray: a cluster too small for training and its evals, missing data.
(What a run writes, learns and logs is checked on the uninterrupted reference run of test_pretrain_faults.py.)"""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import pretrain_params

from tasks.errors import UserError
from tasks.pretrain.stage import pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


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
