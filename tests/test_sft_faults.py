"""SFT on the pretraining path keeps pretraining's guarantees: a training worker SIGKILLed mid-run
resumes from the last checkpoint (the loader's position, AdamW, RNG) and ends with bitwise the same
chat model as a run that never failed (CPU, deterministic)."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
from conftest import pretrain_params, train_worker_processes
from safetensors.torch import load_file
from test_pretrain_faults import _assert_bitwise_equal

pytestmark = pytest.mark.slow


def _workspace(root, small_tokenizer_dir):
    """A micro "milestone" (random weights, the small test tokenizer), params with one SFT variant on
    the world's chat data: ~15 steps of 8 packed rows, a checkpoint every 3 steps."""
    from model.config import micro
    from model.hf import save_hf
    from model.llama import Llama
    from tasks.params import parse_params

    raw = pretrain_params(root, checkpoint_every_steps=3).model_dump(mode="json")
    raw["sft"] = {"checkpoint_dir": str(root / "checkpoints-sft"), "variants": [
        {"name": "v", "base": "24.576K", "sources": [{"name": "world", "format": "builtin"}], "epochs": 2,
         "lr": 1e-3, "max_length": 128, "batch_size": 8, "micro_batch": 2}]}
    torch.manual_seed(0)
    save_hf(Llama(micro()), root / "models" / "pretrain" / "24.576K", small_tokenizer_dir,
            metadata={"milestone": "24.576K", "tokens_seen": 24576})
    return parse_params(raw, "test params")


def _train(params, resume="auto"):
    from tasks.layout import Layout, with_absolute_paths
    from tasks.sft.jobs import plan_jobs
    from tasks.sft.training import train_job

    params = with_absolute_paths(params)
    layout = Layout.from_params(params)
    (job,) = plan_jobs(params, layout, "sft")
    return train_job(params, layout, job, parent_run=None, resume=resume), layout.sft_dir("v")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_tokenizer_dir, local_ray):
    import os

    root = tmp_path_factory.mktemp("sft-reference")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    try:
        metrics, out = _train(_workspace(root, small_tokenizer_dir))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    return metrics, load_file(str(out / "model.safetensors"))


def test_killed_worker_resumes_sft_to_identical_weights(reference, tmp_path, small_tokenizer_dir, monkeypatch,
                                                        local_ray):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = _workspace(tmp_path, small_tokenizer_dir)
    expected_metrics, expected = reference
    assert expected_metrics["steps"] >= 9
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(result=_train(params)))
    driver.start()
    deadline = time.time() + 300
    while not list(tmp_path.glob("checkpoints-sft/*/checkpoint_*/checkpoint.json")) and time.time() < deadline:
        time.sleep(0.05)
    workers = train_worker_processes()
    assert len(workers) == 2, "no training worker to kill"
    assert not (tmp_path / "models" / "sft" / "v").exists(), "the run finished before the kill"
    workers[-1].send_signal(signal.SIGKILL)
    driver.join(timeout=600)
    metrics, out = outcome["result"]
    assert metrics["steps"] == expected_metrics["steps"]
    _assert_bitwise_equal(load_file(str(out / "model.safetensors")), expected)
