"""HSDP (`train.mesh`, tasks/train/parallel.py) on CPU/gloo: four processes as a 2 × 2 mesh (two
"nodes" of two) train the same 20 steps as FSDP2 over all four, and the losses agree to float tolerance.
The same code path NCCL runs on 2 nodes × 8 GPUs; the parameters really are 2-D DTensors (replicated
over the outer dim, sharded over the inner one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.params import parse_params

STEPS, WORLD, MESH = 20, 4, (2, 2)


def _train(rank: int, port: int, out: str) -> None:
    """Both runs in one process group (process start-up is most of the cost): FSDP2 over all 4 ranks, then HSDP."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard

    from model.config import micro
    from model.llama import Llama
    from tasks.train.parallel import Parallel, build_optimizer

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        found = {}
        for label, mesh in (("fsdp", None), ("hsdp", MESH)):
            torch.manual_seed(0)
            model = Llama(micro())
            parallel = Parallel(model, "fsdp", torch.device("cpu"), "fp32", mesh=mesh)
            weight = model.layers[0].mlp.down_proj.weight
            if mesh:
                assert weight.placements == (Replicate(), Shard(0)), weight.placements
            optimizer = build_optimizer(model, 3e-3, (0.9, 0.95), 1e-8, 0.1)
            rows = torch.randint(0, micro().vocab_size, (2, 33), generator=torch.Generator().manual_seed(rank))
            losses = []
            for _ in range(STEPS):  # each rank's own rows every step: a loss that must fall
                loss = parallel.loss(rows)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                losses.append(mean.item() / WORLD)
            found[label] = {"losses": losses,
                            "layout": [weight.device_mesh.ndim, [type(p).__name__ for p in weight.placements]]}
        if rank == 0:
            Path(out).write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def test_hsdp_on_a_2x2_mesh_trains_like_fsdp_over_all_ranks(tmp_path):
    import torch.multiprocessing as mp
    from servers import free_port

    out = tmp_path / "losses.json"
    mp.spawn(_train, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    found = json.loads(out.read_text())
    fsdp, hsdp = found["fsdp"], found["hsdp"]
    assert fsdp["layout"] == [1, ["Shard"]] and hsdp["layout"] == [2, ["Replicate", "Shard"]]
    assert len(hsdp["losses"]) == STEPS and hsdp["losses"][-1] < hsdp["losses"][0], "it trains"
    assert hsdp["losses"] == pytest.approx(fsdp["losses"], rel=1e-5, abs=1e-6)


def _with_train(**overrides) -> dict:
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["train"].update({"strategy": "fsdp", **overrides})
    return raw


def test_mesh_must_cover_every_worker_and_needs_fsdp():
    from tasks.errors import UserError

    assert parse_params(_with_train(mesh={"replicate": 1, "shard": 2})).train.mesh.shard == 2
    with pytest.raises(UserError, match=r"train.mesh: replicate × shard = 6 must equal train.workers \(2\)"):
        parse_params(_with_train(mesh={"replicate": 2, "shard": 3}))
    with pytest.raises(UserError, match="train.mesh: a device mesh needs train.strategy 'fsdp'"):
        parse_params(_with_train(strategy="ddp", mesh={"replicate": 1, "shard": 2}))


def test_lm_head_gradient_of_bf16_weights_is_summed_over_chunks_in_fp32():
    """Many chunks of bf16 products: the weight's gradient is within one bf16 rounding of the exact one
    (a bf16 running sum over 256 chunks drifts by many roundings)."""
    from model.loss import linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1024, 64, generator=generator).bfloat16()
    weight = (torch.randn(512, 64, generator=generator) * 0.05).bfloat16().requires_grad_()
    targets = torch.randint(0, 512, (1024,), generator=generator)
    linear_cross_entropy(hidden, weight, targets, chunk=4).backward()
    exact_weight = weight.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(hidden.double() @ exact_weight.t(), targets).backward()
    error = (weight.grad.double() - exact_weight.grad).abs().max()
    assert weight.grad.dtype == torch.bfloat16
    assert error <= 2 * 2**-8 * exact_weight.grad.abs().max(), error
