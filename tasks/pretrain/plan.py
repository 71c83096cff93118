"""`tinyllama plan`: the dry run of a profile, checked without the hardware (like torchtitan's).

The model is built on the meta device, so the 1.1B plan costs no memory; the parameter
count is cross-checked against the config's closed-form count.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from tasks.errors import UserError
from tasks.params import Params, add_params_argument, format_tokens, load_params

GIB = 2**30
BYTES_PER_ACTIVATION_PER_TOKEN_PER_DIM_PER_LAYER = 34  # Korthikanti et al. 2022, bf16, flash attention


@dataclass
class Plan:
    profile: str
    parameters: int
    parameters_non_embedding: int
    workers: int
    device: str
    seq_len: int
    micro_batch: int
    grad_accum: int
    tokens_per_step: int
    total_tokens: int
    total_steps: int
    milestones: dict[str, int]
    flops_per_token: int
    memory_per_gpu_gib: dict[str, float]
    tokens_per_sec_per_worker: float
    days: float
    mfu_at_that_speed: float


def count_parameters_on_meta(params: Params) -> int:
    import torch

    from model.llama import Llama

    with torch.device("meta"):
        model = Llama(params.llama_config())
    return sum(p.numel() for p in model.parameters())


def memory_per_gpu(params: Params, n_params: int) -> dict[str, float]:
    """Rough bytes per GPU: sharded fp32 master weights, grads and AdamW moments, activations, logits."""
    config = params.llama_config()
    train = params.train
    shards = train.workers if train.strategy == "fsdp" else 1
    act_bytes = 2 if train.precision == "bf16" else 4
    tokens = train.micro_batch * params.data.seq_len
    states = {
        "weights_fp32": 4 * n_params / shards,
        "grads_fp32": 4 * n_params / shards,
        "adamw_moments": 8 * n_params / shards,
        "activations": tokens * config.dim * config.n_layer
        * BYTES_PER_ACTIVATION_PER_TOKEN_PER_DIM_PER_LAYER * act_bytes / 2,
        "logits": tokens * config.vocab_size * (act_bytes + 4),
    }
    states = {k: round(v / GIB, 2) for k, v in states.items()}
    states["total"] = round(sum(states.values()), 2)
    return states


def make_plan(params: Params) -> Plan:
    config = params.llama_config()
    n_params = count_parameters_on_meta(params)
    if n_params != config.num_params():
        raise AssertionError(f"meta model has {n_params} parameters, the config says {config.num_params()}")
    train = params.train
    tokens_per_step = train.global_batch_tokens
    total_steps = math.ceil(train.total_tokens / tokens_per_step)
    milestones = {format_tokens(m): math.ceil(m / tokens_per_step) for m in train.milestones}
    tps = params.plan.tokens_per_sec_per_worker
    flops = config.flops_per_token(params.data.seq_len)
    return Plan(
        profile=params.profile,
        parameters=n_params,
        parameters_non_embedding=config.num_params(include_embedding=False),
        workers=train.workers,
        device="gpu" if train.use_gpu else "cpu",
        seq_len=params.data.seq_len,
        micro_batch=train.micro_batch,
        grad_accum=params.grad_accum,
        tokens_per_step=tokens_per_step,
        total_tokens=train.total_tokens,
        total_steps=total_steps,
        milestones=milestones,
        flops_per_token=flops,
        memory_per_gpu_gib=memory_per_gpu(params, n_params),
        tokens_per_sec_per_worker=tps,
        days=train.total_tokens / (tps * train.workers) / 86400,
        mfu_at_that_speed=tps * flops / (params.plan.peak_tflops_per_worker * 1e12),
    )


def _duration(days: float) -> str:
    if days >= 1:
        return f"{days:.1f} days"
    minutes = days * 24 * 60
    return f"{minutes / 60:.1f} hours" if minutes >= 90 else f"{minutes:.1f} minutes"


def render(plan: Plan, memory_per_worker_gb: float) -> str:
    mem = plan.memory_per_gpu_gib
    lines = [
        f"profile            {plan.profile}",
        f"parameters         {plan.parameters:,} ({plan.parameters_non_embedding:,} without the embedding)",
        f"workers            {plan.workers} × {plan.device}",
        f"batch              micro {plan.micro_batch} × seq {plan.seq_len} × {plan.workers} workers × "
        f"accum {plan.grad_accum} = {plan.tokens_per_step:,} tokens/step",
        f"total              {format_tokens(plan.total_tokens)} tokens = {plan.total_steps:,} steps",
        "milestones         " + ", ".join(f"{name} @ step {step:,}" for name, step in plan.milestones.items()),
        "memory per device  " + ", ".join(f"{k} {v} GiB" for k, v in mem.items() if k != "total")
        + f" → {mem['total']} GiB of {memory_per_worker_gb:g} GiB" + ("" if mem["total"] <= memory_per_worker_gb else "  (DOES NOT FIT)"),
        f"time               {_duration(plan.days)} at {plan.tokens_per_sec_per_worker:,.0f} tok/s/device "
        f"(MFU {plan.mfu_at_that_speed:.1%}, {plan.flops_per_token / 1e9:.2f} GFLOP/token)",
    ]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    add_params_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--tokens-per-sec", type=float, default=None,
                        help="override plan.tokens_per_sec_per_worker for the time estimate")


def main(args) -> int:
    params = load_params(args.params)
    if args.tokens_per_sec is not None:
        if args.tokens_per_sec <= 0:
            raise UserError(f"--tokens-per-sec: must be > 0, got {args.tokens_per_sec}")
        params.plan.tokens_per_sec_per_worker = args.tokens_per_sec
    plan = make_plan(params)
    print(json.dumps(asdict(plan), indent=2) if args.json else render(plan, params.plan.memory_per_worker_gb))
    return 0
