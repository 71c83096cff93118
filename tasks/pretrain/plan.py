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
    traffic_per_step_gb: dict[str, dict[str, float]]   # FSDP vs HSDP: bytes a node moves per step (traffic_per_step)
    mesh: dict[str, int] | None              # train.mesh (HSDP), None: FSDP2 over every worker (or DDP)
    resources: dict[str, dict[str, float]]   # what a training worker and a milestone eval ask of Ray
    tokens_per_sec_per_worker: float
    days: float
    mfu_at_that_speed: float
    prepare: dict | None = None   # prepare_estimate(): the data stage's expected time, beside training's


def count_parameters_on_meta(params: Params) -> int:
    import torch

    from model.llama import Llama

    with torch.device("meta"):
        model = Llama(params.llama_config())
    return sum(p.numel() for p in model.parameters())


def memory_per_gpu(params: Params, n_params: int) -> dict[str, float]:
    """GiB per training worker for what this code keeps in memory (tasks/train/parallel.py, model/loss.py):
    - fp32 master weights, their gradients and AdamW's two moments, sharded across workers under FSDP2
      (across one node's `train.mesh.shard` under HSDP), and during gradient accumulation the full unsharded
      fp32 gradients FSDP2 keeps between micro-batches;
    - bf16 copies FSDP2 all-gathers for compute (`train.precision: bf16`): the root module's (embedding,
      final norm, lm_head) for the whole step, and two decoder blocks' at a time (one computing, one
      prefetched); DDP keeps fp32 weights whole instead;
    - activations per layer: ~34 bytes × tokens × hidden at 16 bits with SDPA's fused attention (Korthikanti
      et al. 2022), ×2 in fp32; with activation checkpointing only each block's input (2 bytes × tokens ×
      hidden at 16 bits) plus one block's full activations during its recompute;
    - the chunked loss (model/loss.py): one chunk of at most 2^25 logits (16-bit logits, their fp32 copy and
      fp32 gradient) and the gradient of the final hidden states, never the full logits.
    `benchmarks/pretrain.py --gpu-1b` measures the real peak on a GPU beside this estimate."""
    config = params.llama_config()
    train = params.train
    fsdp = train.strategy == "fsdp"
    shards = (train.mesh.shard if train.mesh else train.workers) if fsdp else 1  # HSDP shards within a node
    compute_bytes = 2 if train.precision == "bf16" else 4
    tokens = train.micro_batch * params.data.seq_len
    per_block = config.num_params(include_embedding=False) - config.dim  # without the final norm
    per_block //= config.n_layer
    root = n_params - per_block * config.n_layer
    per_layer_activations = 34 * tokens * config.dim * compute_bytes / 2
    if train.activation_checkpointing:
        activations = config.n_layer * compute_bytes * tokens * config.dim + per_layer_activations
    else:
        activations = config.n_layer * per_layer_activations
    chunk_rows = max(1, (1 << 25) // config.vocab_size)
    states = {
        "weights_fp32": 4 * n_params / shards,
        "grads_fp32": 4 * n_params / shards,
        # Under FSDP2, micro-steps that skip the gradient reduce-scatter (accumulation) keep each parameter's
        # full, unsharded fp32 gradient until the step's last micro-batch reduces it.
        "grads_unsharded_accumulating": 4 * n_params if fsdp and params.grad_accum > 1 else 0,
        "adamw_moments": 8 * n_params / shards,
        "gathered_weights": (compute_bytes * (root + 2 * per_block) if fsdp and compute_bytes == 2 else 0),
        "activations": activations,
        "loss_chunk": min(tokens, chunk_rows) * config.vocab_size * (compute_bytes + 4 + 4)
        + tokens * config.dim * compute_bytes,
    }
    states = {k: round(v / GIB, 2) for k, v in states.items()}
    states["total"] = round(sum(states.values()), 2)
    return states


def traffic_per_step(params: Params, n_params: int) -> dict[str, dict[str, float]]:
    """GB moved per optimizer step, each way: what one GPU gets from its node's peers, and what one node gets
    from the other nodes (the inter-node link is the bottleneck without EFA), for FSDP2 over
    every worker and for HSDP (`train.mesh`; without one, `mesh.shard` = 8 GPUs per node is assumed). What
    must move whatever the collective algorithm: an all-gather brings each rank the shards it lacks, a
    reduce-scatter sends each shard's partial sums to its owner, an all-reduce over R replicas sends
    2 (R-1)/R of the data.
    - FSDP (reshard_after_forward): bf16 weights gathered twice per micro-batch (forward, backward), fp32
      gradients reduce-scattered once per step; with N ranks on nodes of S, (N - S)/N of every shard lives
      on another node.
    - HSDP: the same gathers and reduce-scatter within the node (S ranks), then one fp32 all-reduce of the
      node's gradient across the R nodes."""
    train = params.train
    weight_bytes = (2 if train.precision == "bf16" else 4) * n_params
    grad_bytes = 4 * n_params
    accum = params.grad_accum
    n = train.workers
    s = train.mesh.shard if train.mesh else min(n, 8)
    replicas = max(1, n // s)
    gathers = 2 * accum * weight_bytes
    fsdp_total = gathers + grad_bytes  # one node's share of everything the N ranks exchange
    fsdp = {"within_node": fsdp_total * (s - 1) / n, "across_nodes": fsdp_total * (n - s) / n}
    hsdp = {"within_node": (gathers + grad_bytes) * (s - 1) / s,
            "across_nodes": grad_bytes * 2 * (replicas - 1) / replicas}
    return {name: {k: round(v / 1e9, 2) for k, v in found.items()} for name, found in (("fsdp", fsdp), ("hsdp", hsdp))}


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
        traffic_per_step_gb=traffic_per_step(params, n_params),
        mesh=train.mesh.model_dump() if train.mesh else None,
        resources=_resources(params),
        tokens_per_sec_per_worker=tps,
        days=train.total_tokens / (tps * train.workers) / 86400,
        mfu_at_that_speed=tps * flops / (params.plan.peak_tflops_per_worker * 1e12),
        prepare=prepare_estimate(params),
    )


# ---------------------------------------------------------------- prepare (the data stage)


def prepare_estimate(params: Params) -> dict | None:
    """`prepare`'s expected time for the profile's corpus (`data.corpus_tokens`): phase 1 takes the longer
    of the `data.encode_processes` CPU workers tokenizing at `data.tokens_per_cpu_second` each and the
    driver receiving and sealing every token at `data.seal_tokens_per_second`; phase 2, the driver packing
    every token into the shards at `data.pack_tokens_per_second`, comes after it. None without a corpus size."""
    data = params.data
    if data.corpus_tokens is None:
        return None
    from tasks.data.shards import token_dtype

    workers_s = data.corpus_tokens / (data.tokens_per_cpu_second * data.encode_processes)
    seal_s = data.corpus_tokens / data.seal_tokens_per_second
    pack_s = data.corpus_tokens / data.pack_tokens_per_second
    # the sealed units wait on the driver's disk ({paths.data}/.prepare.tmp) until phase 2 packs them
    staging_gb = data.corpus_tokens * token_dtype(params.tokenizer.vocab_size).itemsize / 1e9
    return {"corpus_tokens": data.corpus_tokens, "workers": data.encode_processes,
            "tokens_per_cpu_second": data.tokens_per_cpu_second,
            "seal_tokens_per_second": data.seal_tokens_per_second,
            "pack_tokens_per_second": data.pack_tokens_per_second,
            "workers_days": workers_s / 86400, "seal_days": seal_s / 86400,
            "tokenize_days": max(workers_s, seal_s) / 86400, "pack_days": pack_s / 86400,
            "days": (max(workers_s, seal_s) + pack_s) / 86400, "staging_disk_gb": staging_gb}


def _render_prepare(estimate: dict | None) -> list[str]:
    if estimate is None:
        return ["prepare            (set data.corpus_tokens for an estimate)"]
    workers = f"{estimate['workers']} CPU workers at {estimate['tokens_per_cpu_second']:,.0f} tok/CPU-s"
    driver = f"the driver sealing at {estimate['seal_tokens_per_second']:,.0f} tok/s"
    bound, other = ((driver, workers) if estimate["seal_days"] > estimate["workers_days"] else (workers, driver))
    other_days = min(estimate["seal_days"], estimate["workers_days"])
    return [f"prepare            {_duration(estimate['days'])} for {format_tokens(estimate['corpus_tokens'])} tokens: "
            f"tokenizing {_duration(estimate['tokenize_days'])}, bound by {bound} ({other}: "
            f"{_duration(other_days)}), then packing {_duration(estimate['pack_days'])} on the driver "
            f"(one process at {estimate['pack_tokens_per_second']:,.0f} tok/s)",
            f"{'':19}{estimate['staging_disk_gb']:,.0f} GB of sealed tokens on the driver's disk until packed"]


def _resources(params: Params) -> dict[str, dict[str, float]]:
    from tasks.ray_cluster import training_bundles

    bundles = training_bundles(params)
    found = {"training_worker": bundles[0]}
    if params.train.eval_milestones_during_training:
        found["milestone_eval"] = bundles[-1]
    return found


def _bundle(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name} {amount:g}" for name, amount in bundle.items()) + "}"


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
        + f" → {mem['total']} GiB of {memory_per_worker_gb:g} GiB"
        + ("" if mem["total"] <= memory_per_worker_gb else "  (DOES NOT FIT)"),
        "traffic per step   " + "; ".join(
            f"{name.upper()}{' (this profile)' if (name == 'hsdp') == bool(plan.mesh) else ''} "
            f"{v['within_node']} GB per GPU within its node, {v['across_nodes']} GB per node across nodes"
            for name, v in plan.traffic_per_step_gb.items()),
        "resources          " + f"{plan.workers} training workers × {_bundle(plan.resources['training_worker'])}"
        + (f" + milestone evals {_bundle(plan.resources['milestone_eval'])} (eval.resources), checked before "
           f"training starts" if "milestone_eval" in plan.resources else ""),
        f"time               {_duration(plan.days)} at {plan.tokens_per_sec_per_worker:,.0f} tok/s/device "
        f"(MFU {plan.mfu_at_that_speed:.1%}, {plan.flops_per_token / 1e9:.2f} GFLOP/token)",
    ]
    lines += _render_prepare(plan.prepare)
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
