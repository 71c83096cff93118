"""DDP / FSDP2 behind one interface (tasks/train/parallel.py): the cluster profile's bf16 mixed
precision and activation checkpointing, on a one-process gloo group (the same code NCCL runs on GPUs)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from model.config import micro
from model.llama import Llama
from tasks.train.parallel import Parallel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def process_group():
    from servers import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _rows(config, batch: int = 2, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))


def _count_calls(module: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    return seen


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def test_activation_checkpointing_recomputes_each_block_and_gives_the_same_gradients(process_group):
    torch.manual_seed(0)
    plain = Llama(micro())
    checkpointed = copy.deepcopy(plain)
    rows = _rows(plain.config)
    calls = {}
    for name, model, ac in (("plain", plain, False), ("checkpointed", checkpointed, True)):
        calls[name] = _count_calls(model.layers[0].self_attn.o_proj)
        Parallel(model, "fsdp", torch.device("cpu"), "fp32", activation_checkpointing=ac).loss(rows).backward()
    assert len(calls["plain"]) == 1 and len(calls["checkpointed"]) == 2, "the block's forward runs again in backward"
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(_full(a.grad), _full(b.grad)), name
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()], \
        "parameter names (HF's) must not change"


def test_bf16_under_fsdp_computes_in_bf16_and_keeps_fp32_weights_and_gradients(process_group):
    torch.manual_seed(0)
    model = Llama(micro())
    seen = _count_calls(model.layers[1].mlp.down_proj)
    parallel = Parallel(model, "fsdp", torch.device("cpu"), "bf16")
    assert parallel.autocast_dtype is None, "FSDP2's policy casts, not autocast"
    loss = parallel.loss(_rows(model.config))
    loss.backward()
    assert seen == [torch.bfloat16]
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert _full(param).dtype == torch.float32 and _full(param.grad).dtype == torch.float32, name


def test_bf16_under_ddp_is_autocast(process_group):
    model = Llama(micro())
    parallel = Parallel(model, "ddp", torch.device("cpu"), "bf16")
    seen = _count_calls(model.layers[0].mlp.down_proj)
    parallel.loss(_rows(model.config)).backward()
    assert parallel.autocast_dtype == torch.bfloat16 and seen == [torch.float32]  # weights stay fp32; matmuls autocast
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
