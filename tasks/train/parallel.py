"""Data parallelism for the training loop: DDP (tiny profile, gloo) or FSDP2 `fully_shard` per block
(cluster profile, NCCL), behind one small interface so the loop has a single code path.

Kept apart from model/ (which knows nothing of distribution) in the spirit of torchtitan's
`parallelize.py`. Both strategies run on CPU with gloo, which is how the tests exercise FSDP2.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from model.llama import Llama

TRAINING_METHODS = ("loss", "token_logprobs")
"""What training calls on the model instead of `forward`: the objectives' losses (pretraining and SFT
use `loss`, DPO `token_logprobs`); each goes through the data-parallel wrapper."""


class _Methods(nn.Module):
    """DDP only syncs gradients of work done through its own `forward`, so training's model calls go
    through one: `forward("loss", rows)` is `model.loss(rows)`."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs) -> torch.Tensor:
        return getattr(self.model, method)(*args, **kwargs)


class Parallel:
    """`model` is the plain (possibly sharded) Llama: state dicts and exports read it directly.

    bf16 under FSDP2 is its mixed-precision policy (as torchtitan does): fp32 sharded master weights,
    each block's parameters all-gathered and computed in bf16, gradients reduce-scattered in fp32; no
    autocast. Under DDP, bf16 is autocast. Activation checkpointing recomputes each decoder block in the
    backward pass (the composable `checkpoint`, so parameter names stay HF's)."""

    def __init__(self, model: Llama, strategy: str, device: torch.device, precision: str,
                 activation_checkpointing: bool = False, mesh: tuple[int, int] | None = None):
        self.model, self.strategy, self.device = model, strategy, device
        bf16 = precision == "bf16"
        self.autocast_dtype = torch.bfloat16 if bf16 and strategy != "fsdp" else None
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            for block in model.layers:
                checkpoint(block)
        if strategy == "fsdp":
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

            # The mesh on the training device, said explicitly: FSDP2's default mesh is CUDA's whenever a GPU
            # is visible, which would move a CPU worker's model onto it. A 2-D mesh (replicate, shard) is HSDP:
            # FSDP2 shards over the inner dim (consecutive ranks: one node's GPUs) and replicates over the
            # outer one, so only the once-per-step gradient all-reduce crosses nodes.
            mesh = (init_device_mesh(device.type, mesh, mesh_dim_names=("replicate", "shard")) if mesh
                    else init_device_mesh(device.type, (dist.get_world_size(),)))
            policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
                      else MixedPrecisionPolicy())
            for block in model.layers:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            for method in TRAINING_METHODS:  # these, not `forward`, are what training calls
                register_fsdp_forward_method(model, method)
            self._call = lambda method, *args, **kwargs: getattr(model, method)(*args, **kwargs)
        else:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [device.index] if device.type == "cuda" else None
            self._call = self._ddp = DistributedDataParallel(_Methods(model), device_ids=device_ids)

    def call(self, method: str, *args, **kwargs) -> torch.Tensor:
        """`model.<method>(...)` through the data-parallel wrapper, under autocast when training in bf16."""
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else nullcontext())
        with autocast:
            return self._call(method, *args, **kwargs)

    def loss(self, *args, **kwargs) -> torch.Tensor:
        return self.call("loss", *args, **kwargs)

    def reshard(self) -> None:
        """After forward-only passes (validation). FSDP2 leaves the root module's parameters gathered
        after a forward, because a backward normally follows at once; with none coming, the module
        would keep exposing full tensors instead of its shards to state-dict and checkpoint code."""
        if self.strategy == "fsdp":
            self.model.reshard()

    @contextmanager
    def accumulating(self, sync: bool):
        """Skip the gradient all-reduce / reduce-scatter on every micro step but the last of a step."""
        if sync:
            yield
        elif self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            with self._ddp.no_sync():
                yield


def build_optimizer(model: Llama, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings and projections), none on norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def grad_norm_value(norm: torch.Tensor) -> float:
    """`clip_grad_norm_` returns a DTensor under FSDP2; the full value is the same on every rank."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
