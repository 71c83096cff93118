"""Ray Train's overhead on the pretrain stage: the stage's own training loop under Ray Train against the
same loop in the same processes layout without Ray, interleaved in one invocation.

  .venv/bin/python benchmarks/pretrain.py                 # 2 rounds per side (A B A B), tiny preset, 30 steps each
  .venv/bin/python benchmarks/pretrain.py --steps 8 --rounds 1   # smoke run
  .venv/bin/python benchmarks/pretrain.py --gpu-1b        # 1.1B, one GPU, FSDP2 + bf16, seq 2048 (no Ray)

Both sides run `tasks.train.loop.Trainer` (model, DDP, loader over the same prepared shards, AdamW,
schedule, the loss all-reduce) on 2 processes × 1 thread with torch.distributed over gloo:
- **ray**: the whole stage (`tasks.pretrain.stage.pretrain`), Ray Train starting the workers; a step's time
  is the `tokens_per_s` the stage logs to MLflow for it;
- **bare**: the same `Trainer`, its two processes started by `torch.multiprocessing` and joined in a gloo
  process group by hand; each step timed the same way (`Trainer.train_step`).
"Steady" = the median over steps after `--skip` warm-up steps, leaving out steps that validate or checkpoint.
`ratio` = Ray steady tokens/s ÷ bare steady tokens/s, the median of the per-round-pair ratios. Target ≥ 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def bench_params(root: Path, steps: int, preset: str, **train):
    """The tiny profile (params.yaml) with its training shortened to `steps` and paths under `root`."""
    import yaml

    from tasks.params import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {"data": str(root / "data"), "models": str(root / "models"), "metrics": str(root / "metrics")}
    raw["model"] = {"preset": preset, "overrides": {}}
    raw.pop("sft")  # the chat variants are not part of this measurement
    tokens = steps * raw["train"]["global_batch_tokens"]
    raw["train"].update(total_tokens=tokens, milestones=[tokens], eval_milestones_during_training=False,
                        checkpoint_every_steps=steps, val_every_steps=steps, log_every_steps=max(1, steps // 4),
                        checkpoint_dir=str(root / "checkpoints"), **train)
    return parse_params(raw, "benchmark params")


def write_data(params, root: Path) -> None:
    from conftest import write_prepared

    config = params.llama_config()
    rows = 4 * params.train.total_tokens // params.data.seq_len  # enough for a few epochs' worth of variety
    write_prepared(root / "data", root / "models" / "tokenizer",
                   {s.name: 1 + 2 * i for i, s in enumerate(params.data.sources)},
                   seq_len=params.data.seq_len, vocab_size=config.vocab_size, train_rows=rows,
                   val_rows=256, rows_per_shard=params.data.rows_per_shard)


def _loop_config(params, root: Path):
    from tasks.layout import with_absolute_paths
    from tasks.pretrain.loader import open_prepared
    from tasks.pretrain.objective import PretrainObjective
    from tasks.train.loop import LoopConfig

    params = with_absolute_paths(params)
    return LoopConfig(params=params.model_dump(mode="json"), objective=PretrainObjective(open_prepared(params), None),
                      run_uri=str(root / "bare-run"), tokenizer_files={}, tracking_uri=None, mlflow_run_id="",
                      peak_flops_per_worker=None, console=None)


def _bare_worker(rank: int, world: int, port: int, config, steps: int, device: str, out: str) -> None:
    """One process of the bare side: a gloo (or NCCL) process group by hand, then the stage's Trainer."""
    import torch
    import torch.distributed as dist

    from tasks.train.loop import Placement, Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        trainer = Trainer(config, Placement.from_process_group(torch.device(device)))
        times = [trainer.train_step()["step_time_s"] for _ in range(steps)]
        if rank == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            Path(out).write_text(json.dumps({"step_s": times, "peak_rss_mib": peak}))
    finally:
        dist.destroy_process_group()


def bare_round(params, root: Path, steps: int) -> dict:
    import torch.multiprocessing as mp
    from servers import free_port

    out = root / "bare.json"
    mp.spawn(_bare_worker, args=(params.train.workers, free_port(), _loop_config(params, root), steps, "cpu", str(out)),
             nprocs=params.train.workers, join=True)
    return json.loads(out.read_text())


class TreeRss:
    """Peak summed RSS of this process and all its descendants (Ray's processes included), sampled."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.psutil, self.interval, self.peak, self.peak_worker = psutil, interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self.psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    total += rss
                    if "RayTrainWorker" in " ".join(proc.cmdline()):
                        self.peak_worker = max(self.peak_worker, rss)
                except self.psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ray_round(params, root: Path) -> dict:
    """The whole stage under Ray Train; per-step times from the tokens/s it logs to MLflow."""
    from mlflow.tracking import MlflowClient

    from tasks.pretrain.stage import pretrain

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    started = time.perf_counter()
    with TreeRss() as rss:
        metrics = pretrain(params, resume="never")
    history = sorted(MlflowClient().get_metric_history(metrics["mlflow_run_id"], "tokens_per_s"), key=lambda m: m.step)
    return {"step_s": [params.train.global_batch_tokens / m.value for m in history],
            "wall_s": round(time.perf_counter() - started, 1), "peak_rss_tree_mib": rss.peak // 2**20,
            "peak_rss_mib": rss.peak_worker // 2**20}


def steady_tokens_per_s(step_s: list[float], params, skip: int) -> float:
    """Median over steps after the warm-up, leaving out validation/checkpoint steps (a step n is 1-based)."""
    train = params.train
    steady = [t for n, t in enumerate(step_s, 1)
              if n > skip and n % train.val_every_steps and n % train.checkpoint_every_steps and n < len(step_s)]
    return params.train.global_batch_tokens / statistics.median(steady)


def gpu_1b_params(root: Path, micro_batch: int, activation_checkpointing: bool):
    """configs/tinyllama-1.1b.yaml on one GPU: world 1 with a 1 × 1 `train.mesh` (the 16-GPU run's HSDP code
    path at world size 1), 2 micro-steps of `micro_batch` rows per step, paths under `root`, no evals."""
    import yaml

    from tasks.params import parse_params

    raw = yaml.safe_load((ROOT / "configs" / "tinyllama-1.1b.yaml").read_text())
    raw["paths"] = {"data": str(root / "data"), "models": str(root / "models"), "metrics": str(root / "metrics")}
    raw["data"]["rows_per_shard"] = 512
    tokens_per_step = 2 * micro_batch * raw["data"]["seq_len"]
    raw["train"].update(workers=1, mesh={"replicate": 1, "shard": 1}, micro_batch=micro_batch,
                        global_batch_tokens=tokens_per_step, activation_checkpointing=activation_checkpointing,
                        total_tokens=64 * tokens_per_step, milestones=[64 * tokens_per_step],
                        checkpoint_every_steps=10**6, val_every_steps=10**6,
                        eval_milestones_during_training=False, checkpoint_dir=str(root / "checkpoints"))
    return parse_params(raw, "1.1B benchmark params")


def gpu_1b(steps: int, micro_batch: int, activation_checkpointing: bool) -> dict:
    """The 1.1B recipe on one GPU (`gpu_1b_params`): the stage's Trainer with FSDP2 over NCCL on a 1 × 1 HSDP
    mesh, bf16 mixed precision and the profile's torch.compile, seq 2048, on random token rows; tokens/s/GPU
    and MFU against the configured peak, and the peak memory against `tinyllama plan`'s estimate for the
    same settings."""
    import torch

    from tasks.pretrain.plan import memory_per_gpu

    with tempfile.TemporaryDirectory(prefix="bench-1b-") as tmp:
        root = Path(tmp)
        params = gpu_1b_params(root, micro_batch, activation_checkpointing)
        write_data(params, root)
        out = root / "gpu.json"
        from servers import free_port

        _bare_worker(0, 1, free_port(), _loop_config(params, root), steps, "cuda", str(out))
        times = json.loads(out.read_text())["step_s"]
    steady = statistics.median(times[3:])
    tokens_per_s = params.train.global_batch_tokens / steady
    flops = params.llama_config().flops_per_token(params.data.seq_len) * tokens_per_s
    plan = memory_per_gpu(params, params.llama_config().num_params())
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": steps,
            "micro_batch": micro_batch, "activation_checkpointing": activation_checkpointing,
            "tokens_per_step": params.train.global_batch_tokens, "tokens_per_s_per_gpu": round(tokens_per_s),
            "step_s_median": steady, "first_step_s": times[0],
            "mfu_vs_configured_peak": flops / (params.plan.peak_tflops_per_worker * 1e12),
            "achieved_tflops": flops / 1e12, "anchor": "24k tok/s/GPU, 56% MFU on A100-40G (312 TFLOP/s bf16)",
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "plan_mem_gib": plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="round pairs (bare, Ray), interleaved")
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the medians")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--gpu-1b", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=4, help="--gpu-1b: rows per micro-step")
    parser.add_argument("--activation-checkpointing", action="store_true", help="--gpu-1b: recompute blocks")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "pretrain.json"))
    args = parser.parse_args()
    if args.gpu_1b:
        result = gpu_1b(args.steps, args.micro_batch, args.activation_checkpointing)
    else:
        from tasks.ray_cluster import ray_session

        with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
            root = Path(tmp)
            params = bench_params(root, args.steps, args.preset)
            write_data(params, root)
            rounds = []
            with ray_session(params, "benchmark"):
                for index in range(args.rounds):
                    order = ("bare", "ray") if index % 2 == 0 else ("ray", "bare")
                    measured = {side: (bare_round(params, root, args.steps) if side == "bare"
                                       else ray_round(params, root))
                                for side in order}
                    rate = {side: steady_tokens_per_s(m["step_s"], params, args.skip) for side, m in measured.items()}
                    rounds.append({"order": order, "bare_tokens_per_s": round(rate["bare"]),
                                   "ray_tokens_per_s": round(rate["ray"]),
                                   "ratio": round(rate["ray"] / rate["bare"], 3),
                                   "bare_peak_rss_mib": measured["bare"]["peak_rss_mib"],
                                   "ray_worker_peak_rss_mib": measured["ray"]["peak_rss_mib"],
                                   "ray_tree_peak_rss_mib": measured["ray"]["peak_rss_tree_mib"],
                                   "ray_stage_wall_s": measured["ray"]["wall_s"]})
                    print(json.dumps(rounds[-1]), flush=True)
        ratio = statistics.median(r["ratio"] for r in rounds)
        result = {"model": args.preset, "steps": args.steps, "tokens_per_step": params.train.global_batch_tokens,
                  "workers": params.train.workers, "threads_per_worker": params.train.threads_per_worker,
                  "rounds": rounds, "ratio": ratio, "target": 0.9, "target_met": ratio >= 0.9}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
