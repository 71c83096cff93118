"""The pretrain stage on a local Ray: one uninterrupted reference run (what it writes, learns and logs), and
fault tolerance proven by final weights bitwise equal to it (CPU, deterministic): a training worker SIGKILLed
mid-run, and FSDP2 against DDP, resumed past a corrupt shard. A killed driver whose newest checkpoint was cut
short is rehearsed where users meet it: `dvc repro` rerun (tests/test_dag.py), and on S3 behind a
multi-node cluster (tests/test_cluster_rehearsal.py)."""

import contextlib
import io
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import pretrain_params, time_limit, train_worker_processes, write_prepared
from mlflow import MlflowClient
from safetensors.torch import load_file

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


@dataclass
class Reference:
    """The uninterrupted run: its workspace, what pretrain returned and printed, its final weights."""
    root: Path
    metrics: dict
    output: str
    weights: dict[str, torch.Tensor]

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, local_ray):
    """An uninterrupted run: what the fault tests must end in, and what the learning test reads."""
    from tasks.pretrain.stage import pretrain

    root = tmp_path_factory.mktemp("reference")
    printed = io.StringIO()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    try:
        with time_limit(900, "the reference pretrain run"), contextlib.redirect_stdout(printed):
            metrics = pretrain(_workspace(root))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    return Reference(root, metrics, printed.getvalue(), _final_weights(root))


def test_pretrain_learns_exports_milestones_and_logs(reference):
    from model.hf import load_hf, read_hf_config

    root, steps = reference.root, STEPS
    written = json.loads((root / "metrics" / "pretrain.json").read_text())
    assert written == reference.metrics
    assert set(written) == {"mlflow_run_id", "final_train_loss", "final_val_loss", "tokens", "steps",
                            "wall_time_s", "tokens_per_s"}
    assert (written["steps"], written["tokens"]) == (steps, steps * 1024)
    assert written["final_val_loss"] < math.log(512) - 1.0  # below chance: the arithmetic-sequence fixture is learnable
    assert written["tokens_per_s"] > 0 and written["wall_time_s"] > 0

    milestones = {"8.192K": 8, FINAL: steps}
    for name, step in milestones.items():
        directory = root / "models" / "pretrain" / name
        meta = read_hf_config(directory)["tinyllama"]
        assert meta == {"milestone": name, "milestone_tokens": step * 1024, "tokens_seen": step * 1024, "step": step}
        assert (directory / "tokenizer.model").read_bytes() == \
            (root / "models" / "tokenizer" / "tokenizer.model").read_bytes()
    early, late = (load_hf(root / "models" / "pretrain" / name) for name in milestones)
    val = torch.tensor([[(7 + i) % 512 for i in range(65)]])  # an unseen alpha-like row
    with torch.no_grad():
        assert late.loss(val) < early.loss(val)

    client = MlflowClient(tracking_uri=reference.tracking_uri)
    run = client.get_run(written["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["model.preset"] == "micro"
    assert run.data.params["derived.grad_accum"] == "2"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, steps + 1)), key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == list(range(8, steps + 1, 8))
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert losses[-1] < losses[0] - 1.0
    for name in milestones:  # each milestone's HF dir is browsable in the run's artifacts
        logged = {a.path for a in client.list_artifacts(run.info.run_id, f"checkpoints/{name}")}
        assert f"checkpoints/{name}/model.safetensors" in logged and f"checkpoints/{name}/config.json" in logged

    run_dirs = list((root / "checkpoints").iterdir())
    assert len(run_dirs) == 1
    kept = sorted(p.name for p in run_dirs[0].iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert kept == [f"checkpoint_{step:010d}" for step in (steps - 4, steps)]  # every 4 steps, keep_checkpoints: 2
    assert f"step {steps}/{steps} | tokens {FINAL}/{FINAL} | loss" in reference.output


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
    _assert_bitwise_equal(_final_weights(tmp_path), reference.weights)


def test_fsdp2_on_cpu_matches_ddp_and_resumes_from_sharded_checkpoints(reference, tmp_path, monkeypatch, local_ray):
    """FSDP2 trains the same weights as DDP; its resume checkpoints hold one safetensors shard per
    rank and no full copy; and a run resumed from them (past a corrupt shard) ends bitwise equal."""
    from tasks.layout import COMPLETE_FILE
    from tasks.pretrain.stage import pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = _workspace(tmp_path, strategy="fsdp")
    first = pretrain(params)
    weights = _final_weights(tmp_path)
    assert weights.keys() == reference.weights.keys()
    for key in reference.weights:
        torch.testing.assert_close(weights[key], reference.weights[key], rtol=1e-4, atol=1e-5, msg=key)

    previous, newest = _checkpoints(tmp_path)[-2:]
    shards = sorted(p.name for p in (newest / "shards").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards), shards
    assert not (newest / "model.safetensors").exists() and not (newest / "optimizer.safetensors").exists()
    assert (sum((newest / "shards" / name).stat().st_size for name in shards)
            > sum(t.numel() * 4 for t in weights.values()))

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
