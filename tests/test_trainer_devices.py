"""The training loop's collectives and sharded checkpoints on the device it trains on: FSDP2 over a
one-process group, train steps (the loss all-reduce), validation, a sharded checkpoint written and
restored into a fresh trainer, a milestone export. On CPU over gloo here; on a GPU over NCCL with bf16
mixed precision (the cluster profile's settings) where one is present: NCCL has no CPU backend, so a
collective on a CPU tensor fails there, which is what the CUDA case is for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import pretrain_params, write_prepared

CUDA = torch.cuda.is_available()


def _trainer(root: Path, device: str, precision: str):
    from tasks.layout import with_absolute_paths
    from tasks.pretrain.loader import open_prepared
    from tasks.pretrain.objective import PretrainObjective
    from tasks.train.loop import LoopConfig, Placement, Trainer

    params = with_absolute_paths(pretrain_params(root, strategy="fsdp", precision=precision, workers=1,
                                                 global_batch_tokens=512, use_gpu=device == "cuda"))
    config = LoopConfig(params=params.model_dump(mode="json"), objective=PretrainObjective(open_prepared(params), None),
                        run_uri=str(root / "run"), tokenizer_files={"tokenizer.json": b"{}"}, tracking_uri=None,
                        mlflow_run_id="", peak_flops_per_worker=1e12, console=None)
    return Trainer(config, Placement.from_process_group(torch.device(device)))


def _run_and_resume(root: Path, device: str, backend: str, precision: str) -> dict:
    from servers import free_port

    from tasks.pretrain.export import hf_from_sharded_checkpoint
    from tasks.train.checkpoint import checkpoint_name, save_checkpoint

    write_prepared(root / "data", root / "models" / "tokenizer", {"alpha": 1, "beta": 3},
                   seq_len=64, vocab_size=512, train_rows=300, val_rows=40, rows_per_shard=128)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        trainer = _trainer(root, device, precision)
        steps = [trainer.train_step() for _ in range(6)]
        losses = [m["loss"] for m in steps]
        val = trainer.val_loss()
        state = {"step": trainer.step, "tokens_seen": trainer.plan.tokens_after(trainer.step),
                 "loader": trainer.loader.state(), "metrics": {"final_train_loss": losses[-1]}}
        save_checkpoint(trainer.config.run_uri, trainer.step, trainer.model, trainer.optimizer, state,
                        sharded=True, keep=2)
        # what rank 0's background export task does with the sealed checkpoint (tasks/pretrain/export.py)
        hf_from_sharded_checkpoint(trainer.config.run_uri, checkpoint_name(trainer.step), "1",
                                   trainer.model.config.to_dict(), trainer.config.tokenizer_files, {"step": 6})
        resumed = _trainer(root, device, precision)
        weights = {k: v.full_tensor().float().cpu() for k, v in trainer.model.state_dict().items()}
        restored = {k: v.full_tensor().float().cpu() for k, v in resumed.model.state_dict().items()}
        return {"losses": losses, "val": val, "step": resumed.step, "gpu_mem": steps[-1].get("gpu_mem_peak_gib"),
                "same": all(torch.equal(weights[k], restored[k]) for k in weights),
                "milestone": json.loads((root / "run" / "milestones" / "1" / "milestone.json").read_text())}
    finally:
        dist.destroy_process_group()


def _check(outcome: dict) -> None:
    assert all(torch.isfinite(torch.tensor(loss)) for loss in outcome["losses"])
    assert outcome["losses"][-1] < outcome["losses"][0]
    assert torch.isfinite(torch.tensor(outcome["val"]))
    assert outcome["step"] == 6 and outcome["same"], "the sharded checkpoint restores the exact weights"
    assert "model.safetensors" in outcome["milestone"]["files"]


@pytest.mark.usefixtures("one_torch_thread")
def test_fsdp_loop_collectives_and_sharded_resume_on_cpu(tmp_path):
    outcome = _run_and_resume(tmp_path, "cpu", "gloo", "fp32")
    _check(outcome)
    assert outcome["gpu_mem"] is None, "the GPU memory metric only where there is a GPU"


def test_a_cpu_trainer_leaves_deterministic_kernels_off_for_a_cuda_one():
    """The flag is process-wide, and deterministic cuBLAS fails without CUBLAS_WORKSPACE_CONFIG: after the CPU test
    above, the CUDA one below runs in the same process."""
    from tasks.train.loop import deterministic_kernels

    was = torch.are_deterministic_algorithms_enabled()
    try:
        deterministic_kernels(torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
        deterministic_kernels(torch.device("cuda", 0))
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (NCCL, bf16): run where one is present")
def test_fsdp_bf16_loop_over_nccl_on_a_gpu(tmp_path):
    outcome = _run_and_resume(tmp_path, "cuda", "nccl", "bf16")
    _check(outcome)
    assert 0 < outcome["gpu_mem"] < torch.cuda.get_device_properties(0).total_memory / 2**30
