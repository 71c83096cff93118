"""Full training step (forward, backward, AdamW) of our Llama vs transformers' LlamaForCausalLM.

Why it is built this way: these machines are shared and noisy, so absolute numbers drift by
tens of percent between minutes. Every contender therefore runs in the same process on the
same weights and batch, round-robin (the start rotates each round), and each round also
re-measures the fp32 matmul peak. Ratios are taken within a round and the medians reported,
so drift shared by a round cancels out.

    .venv/bin/python benchmarks/train_step.py            # the measurement (~5 minutes on 2 quiet cores)
    .venv/bin/python benchmarks/train_step.py --quick    # smoke run: 2 rounds of 1 step

Contenders: `ours` (the training fast path: the whole loss compiled, chunked fused loss),
`ours_eager`, `hf_eager` and `hf_compiled` (the whole forward + loss under torch.compile).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import LlamaConfig, preset  # noqa: E402
from model.hf import config_to_hf, to_hf_state_dict  # noqa: E402
from model.llama import Llama  # noqa: E402

CONTENDERS = ("ours", "ours_eager", "hf_eager", "hf_compiled")
EXTRA_CONTENDERS = ("ours_blocks",)  # by name only (--contenders): the FSDP2 path's compilation
TARGETS = {"hf_eager": 1.25, "hf_compiled": 1.0}  # ours must be at least this many times as fast


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    loss_fn: object
    optimizer: torch.optim.Optimizer
    warmup_s: float = 0.0
    first_loss: float = float("nan")
    tokens_per_s: list[float] = field(default_factory=list)

    def step(self, rows: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(rows)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def matmul_gflops(n: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` fp32 GEMM throughput right now: the peak the MFU is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # Identical for every contender (the recipe's AdamW), so only the model differs.
    return torch.optim.AdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def build_ours(config: LlamaConfig, state: dict, compiled: bool) -> Contender:
    model = Llama(config)
    model.load_state_dict(state)
    model.train()
    if compiled:
        model.compile_loss()
    return Contender("ours" if compiled else "ours_eager", model, model.loss, _optimizer(model))


def build_ours_blocks(config: LlamaConfig, state: dict) -> Contender:
    """Per-block compilation, the fast path of a model FSDP2 shards (the cluster profile)."""
    model = Llama(config)
    model.load_state_dict(state)
    model.train()
    return Contender("ours_blocks", model, model.compile_blocks().loss, _optimizer(model))


def build_hf(config: LlamaConfig, state: dict, compiled: bool) -> Contender:
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_config = HFConfig(**config_to_hf(config))
    model = LlamaForCausalLM(hf_config).train()
    model.load_state_dict(state)

    def loss_fn(rows: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=rows[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())

    fn = torch.compile(loss_fn) if compiled else loss_fn
    return Contender("hf_compiled" if compiled else "hf_eager", model, fn, _optimizer(model))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    config = preset(args.preset).with_overrides(max_seq_len=max(args.seq, preset(args.preset).max_seq_len))
    torch.manual_seed(0)
    reference = Llama(config)
    ours_state = reference.state_dict()
    hf_state = to_hf_state_dict(reference)
    rows = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))
    tokens = args.batch * args.seq

    builders = {"ours": lambda: build_ours(config, ours_state, True),
                "ours_eager": lambda: build_ours(config, ours_state, False),
                "hf_eager": lambda: build_hf(config, hf_state, False),
                "hf_compiled": lambda: build_hf(config, hf_state, True),
                "ours_blocks": lambda: build_ours_blocks(config, ours_state)}
    contenders = []
    for name in args.contenders:
        contender = builders[name]()
        start = time.perf_counter()
        contender.first_loss = contender.step(rows)
        for _ in range(args.warmup - 1):
            contender.step(rows)
        contender.warmup_s = time.perf_counter() - start
        print(f"{name:12s} warmup {contender.warmup_s:6.1f}s  first loss {contender.first_loss:.6f}", flush=True)
        contenders.append(contender)
    spread = max(c.first_loss for c in contenders) - min(c.first_loss for c in contenders)
    if spread > 1e-3:
        raise SystemExit(f"first losses differ by {spread:.2e}: the contenders do not compute the same function")

    peaks = []
    for r in range(args.rounds):
        peaks.append(matmul_gflops())
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for contender in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                contender.step(rows)
            contender.tokens_per_s.append(args.steps * tokens / (time.perf_counter() - start))
        line = "  ".join(f"{c.name} {c.tokens_per_s[-1]:6.0f}" for c in contenders)
        print(f"round {r + 1}/{args.rounds}: peak {peaks[-1]:5.0f} GFLOP/s  tok/s: {line}", flush=True)

    flops = config.flops_per_token(args.seq)
    results = {}
    for c in contenders:
        mfu = [tps * flops / (peak * 1e9) for tps, peak in zip(c.tokens_per_s, peaks)]
        results[c.name] = {"tokens_per_s": statistics.median(c.tokens_per_s), "best_tokens_per_s": max(c.tokens_per_s),
                           "mfu": statistics.median(mfu),
                           "warmup_s": c.warmup_s, "first_loss": c.first_loss, "rounds": c.tokens_per_s}
    by_name = {c.name: c for c in contenders}
    ratios = {}
    if "ours" in by_name:
        for other in contenders:
            if other.name != "ours":
                per_round = [a / b for a, b in zip(by_name["ours"].tokens_per_s, other.tokens_per_s)]
                ratios[f"ours/{other.name}"] = statistics.median(per_round)
    return {"config": config.to_dict(), "batch": args.batch, "seq": args.seq, "threads": args.threads,
            "rounds": args.rounds, "steps_per_round": args.steps, "flops_per_token": flops,
            "matmul_peak_gflops": statistics.median(peaks), "peaks": peaks,
            "contenders": results, "ratios": ratios}


def report(result: dict) -> str:
    lines = [f"fp32, {result['threads']} threads, batch {result['batch']} × seq {result['seq']}, "
             f"{result['rounds']} rounds × {result['steps_per_round']} steps; "
             f"matmul peak (median) {result['matmul_peak_gflops']:.0f} GFLOP/s; "
             f"{result['flops_per_token'] / 1e6:.1f} MFLOP/token",
             f"{'contender':12s} {'tok/s':>8s} {'best':>6s} {'MFU':>6s} {'warmup':>8s}"]
    for name, r in result["contenders"].items():
        lines.append(f"{name:12s} {r['tokens_per_s']:8.0f} {r['best_tokens_per_s']:6.0f} {r['mfu']:6.1%} "
                     f"{r['warmup_s']:7.1f}s")
    for name, ratio in result["ratios"].items():
        target = TARGETS.get(name.split("/")[1])
        verdict = "" if target is None else f"  (target ≥ {target:.2f}: {'met' if ratio >= target else 'MISSED'})"
        lines.append(f"{name:24s} {ratio:5.2f}×{verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 step, 1 warmup step")
    parser.add_argument("--preset", default="bench-55m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per contender per round (few: "
                        "fine interleaving keeps the contenders of a round under the same load)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated subset of {', '.join(CONTENDERS + EXTRA_CONTENDERS)}")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "train_step.json")
    args = parser.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in CONTENDERS + EXTRA_CONTENDERS]
    if unknown:
        parser.error(f"--contenders: unknown {unknown[0]!r} (known: {', '.join(CONTENDERS + EXTRA_CONTENDERS)})")
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 1, 1
    result = run(args)
    print(report(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
