"""Fault tolerance of the pretrain stage, proven by bitwise-equal final weights (CPU, deterministic):
a training worker SIGKILLed mid-run, a killed driver rerun with `--resume auto`, a corrupt newest
checkpoint, and the FSDP2 code path against DDP."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

from conftest import pretrain_params, train_worker_processes, write_prepared

pytestmark = pytest.mark.slow

STEPS = 32
FINAL = "32.768K"  # format_tokens(32 × 1024)


def _workspace(root: Path, **overrides):
    params = pretrain_params(root, total_tokens=STEPS * 1024, milestones=[8 * 1024, STEPS * 1024],
                             checkpoint_every_steps=4, **overrides)
    write_prepared(root / "data", root / "models" / "tokenizer", {"alpha": 1, "beta": 3},
                   seq_len=64, vocab_size=512, train_rows=300, val_rows=40, rows_per_shard=128)
    return params


def _final_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "models" / "pretrain" / FINAL / "model.safetensors"))


def _checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("checkpoints/run-*/checkpoint_*") if (p / "checkpoint.json").exists())


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, local_ray):
    """Final weights of an uninterrupted run."""
    from tasks.pretrain.stage import pretrain

    root = tmp_path_factory.mktemp("reference")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    try:
        pretrain(_workspace(root))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    return _final_weights(root)



def test_killed_worker_resumes_to_identical_weights(reference, tmp_path, monkeypatch, local_ray):
    from tasks.pretrain.stage import pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = _workspace(tmp_path)
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(metrics=pretrain(params)))
    driver.start()
    deadline = time.time() + 300
    while not _checkpoints(tmp_path) and time.time() < deadline:
        time.sleep(0.05)
    workers = train_worker_processes()
    assert len(workers) == 2, "no training worker to kill"
    assert not (tmp_path / "models" / "pretrain" / FINAL).exists(), "the run finished before the kill"
    victim = workers[-1]
    victim.send_signal(signal.SIGKILL)
    driver.join(timeout=600)
    assert outcome["metrics"]["steps"] == STEPS
    _assert_bitwise_equal(_final_weights(tmp_path), reference)


def test_killed_driver_reruns_resume_past_a_corrupt_checkpoint(reference, tmp_path):
    params = _workspace(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    command = [sys.executable, "-m", "tasks.cli", "pretrain", "--params", str(params_file)]

    first = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_checkpoints(tmp_path)) < 2 and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    # The machine "dies": the driver and every process it started (Ray's daemons and workers would
    # otherwise keep training for a moment and write more checkpoints).
    for proc in [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    first.wait(timeout=60)
    saved = _checkpoints(tmp_path)
    assert len(saved) >= 2 and not (tmp_path / "models" / "pretrain" / FINAL).exists()
    newest, previous = saved[-1], saved[-2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert f"resume checkpoint {newest.name} is corrupt" in output
    assert f"resuming from {previous.name}" in output
    assert (newest.parent / f"corrupt-{newest.name}").is_dir()
    _assert_bitwise_equal(_final_weights(tmp_path), reference)


def test_fsdp2_on_cpu_matches_ddp_and_resumes_from_sharded_checkpoints(reference, tmp_path, monkeypatch, local_ray):
    """FSDP2 trains the same weights as DDP; its resume checkpoints hold one safetensors shard per
    rank and no full copy; and a run resumed from them (past a corrupt shard) ends bitwise equal."""
    from tasks.layout import COMPLETE_FILE
    from tasks.pretrain.stage import pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = _workspace(tmp_path, strategy="fsdp")
    first = pretrain(params)
    weights = _final_weights(tmp_path)
    assert weights.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)

    previous, newest = _checkpoints(tmp_path)[-2:]
    shards = sorted(p.name for p in (newest / "shards").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards), shards
    assert not (newest / "model.safetensors").exists() and not (newest / "optimizer.safetensors").exists()
    assert sum((newest / "shards" / name).stat().st_size for name in shards) > sum(t.numel() * 4 for t in weights.values())

    # The driver died after the last checkpoint, and that checkpoint lost part of a shard.
    (newest.parent / COMPLETE_FILE).unlink()
    shard = newest / "shards" / shards[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    second = pretrain(params)
    assert (newest.parent / f"corrupt-{newest.name}").is_dir()
    _assert_bitwise_equal(_final_weights(tmp_path), weights)
    # It resumed (same MLflow run, steps after the previous checkpoint logged twice, none before).
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    resumed_at = int(previous.name.rsplit("_", 1)[1])
    logged = [m.step for m in MlflowClient().get_metric_history(first["mlflow_run_id"], "loss")]
    assert sorted(logged) == sorted([*range(1, STEPS + 1), *range(resumed_at + 1, STEPS + 1)])
