"""Milestone exports from the sealed sharded checkpoint (tasks/pretrain/export.py): two FSDP2 ranks write a
checkpoint as training does; after their process group is gone, a Ray task (no collective, nothing else
running) turns it into the milestone's HF dir with the very weights the ranks held. The task is slowed on
purpose (the export hook); the caller that starts it returns at once and only collects it when done."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.pretrain.export import DELAY_ENV, PendingExports
from tasks.train.checkpoint import MILESTONES_DIR, checkpoint_name

WORLD, STEPS, DELAY_S = 2, 3, 4.0


def _train_and_checkpoint(rank: int, port: int, run_dir: str, reference: str) -> None:
    import torch.distributed as dist

    from model.config import micro
    from model.llama import Llama
    from tasks.train.checkpoint import gather_model, save_checkpoint
    from tasks.train.parallel import Parallel, build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = Llama(micro())
        parallel = Parallel(model, "fsdp", torch.device("cpu"), "fp32")
        optimizer = build_optimizer(model, 3e-3, (0.9, 0.95), 1e-8, 0.1)
        rows = torch.randint(0, micro().vocab_size, (2, 33), generator=torch.Generator().manual_seed(rank))
        for _ in range(STEPS):
            parallel.loss(rows).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        save_checkpoint(run_dir, STEPS, model, optimizer, {"step": STEPS, "tokens_seen": 0, "loader": {},
                                                          "metrics": {}}, sharded=True, keep=2)
        full = gather_model(model)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items()}, reference)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def sharded_run(tmp_path):
    import torch.multiprocessing as mp
    from servers import free_port

    run_dir, reference = tmp_path / "run", tmp_path / "reference.safetensors"
    mp.spawn(_train_and_checkpoint, args=(free_port(), str(run_dir), str(reference)), nprocs=WORLD, join=True)
    return run_dir, load_file(str(reference))


@pytest.fixture(scope="module")
def slow_export_ray(request):
    """The conftest's local Ray, started with the export hook in its environment (its workers inherit it)."""
    import os

    os.environ[DELAY_ENV] = str(DELAY_S)
    try:
        request.getfixturevalue("local_ray")
        yield
    finally:
        os.environ.pop(DELAY_ENV, None)


def test_a_slow_export_from_the_sealed_checkpoint_blocks_nobody_and_holds_the_ranks_weights(
        slow_export_ray, sharded_run):
    from model.config import micro
    from model.hf import load_hf

    run_dir, reference = sharded_run
    tokenizer = {"tokenizer.model": b"not read by the export"}
    metadata = {"milestone": "1K", "milestone_tokens": 1000, "tokens_seen": 1000, "step": STEPS}
    exports = PendingExports()
    started = time.perf_counter()
    exports.submit(str(run_dir), checkpoint_name(STEPS), "1K", micro().to_dict(), tokenizer, metadata)
    assert exports.finished(wait=False) == []
    assert time.perf_counter() - started < DELAY_S / 2, "starting an export must not wait for it"
    ((name, uri, got_metadata),) = exports.finished(wait=True)
    assert time.perf_counter() - started >= DELAY_S and exports.finished(wait=True) == []
    assert name == "1K" and got_metadata == metadata and Path(uri) == run_dir / MILESTONES_DIR / "1K"
    assert (Path(uri) / "milestone.json").is_file() and (Path(uri) / "tokenizer.model").read_bytes() == \
        tokenizer["tokenizer.model"]
    exported = load_hf(uri).state_dict()
    for key, value in reference.items():
        assert torch.equal(exported[key], value), key
