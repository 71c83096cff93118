"""Ray Train's overhead on the pretrain stage: the stage's own training loop under Ray Train against the
same loop in the same processes layout without Ray, interleaved in one invocation.

  .venv/bin/python benchmarks/pretrain.py                 # 2 rounds per side (A B A B), tiny preset, 30 steps each
  .venv/bin/python benchmarks/pretrain.py --steps 8 --rounds 1   # smoke run
  .venv/bin/python benchmarks/pretrain.py --gpu-1b --rounds 1   # 1.1B on one GPU: bare, then the stage under Ray
  .venv/bin/python benchmarks/pretrain.py --gpu-1b --sides bare  # the same without Ray (a machine without it)

Both sides run `tasks.train.loop.Trainer` (model, DDP or FSDP2, loader over the same prepared shards,
AdamW, schedule, the loss all-reduce) on the same workers: 2 processes × 1 thread over gloo for the tiny
preset, 1 GPU over NCCL for `--gpu-1b`:
- **ray**: the whole stage (`tasks.pretrain.stage.pretrain`), Ray Train starting the workers, with its
  checkpoint(s) and milestone export; a step's time is the `tokens_per_s` the stage logs to MLflow for it;
- **bare**: the same `Trainer`, its processes started by `torch.multiprocessing` and joined in a process
  group by hand; each step timed the same way (`Trainer.train_step`).
"Steady" = the median over steps after `--skip` warm-up steps, leaving out steps that validate or checkpoint.
`ratio` = Ray steady tokens/s ÷ bare steady tokens/s, the median of the per-round-pair ratios. Target ≥ 0.9
on the shared CPU box, ≥ 0.95 on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
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
        steps_run = [trainer.train_step() for _ in range(steps)]
        if rank == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            Path(out).write_text(json.dumps({"step_s": [m["step_time_s"] for m in steps_run], "peak_rss_mib": peak,
                                             "gpu_mem_peak_gib": steps_run[-1].get("gpu_mem_peak_gib")}))
    finally:
        dist.destroy_process_group()


def bare_round(params, root: Path, steps: int) -> dict:
    import torch.multiprocessing as mp
    from servers import free_port

    out = root / "bare.json"
    device = "cuda" if params.train.use_gpu else "cpu"
    config = _loop_config(params, root)
    mp.spawn(_bare_worker, args=(params.train.workers, free_port(), config, steps, device, str(out)),
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
    client = MlflowClient()
    history = sorted(client.get_metric_history(metrics["mlflow_run_id"], "tokens_per_s"), key=lambda m: m.step)
    gpu_mem = client.get_metric_history(metrics["mlflow_run_id"], "gpu_mem_peak_gib")
    return {"step_s": [params.train.global_batch_tokens / m.value for m in history],
            "wall_s": round(time.perf_counter() - started, 1), "peak_rss_tree_mib": rss.peak // 2**20,
            "peak_rss_mib": rss.peak_worker // 2**20,
            "gpu_mem_peak_gib": max((m.value for m in gpu_mem), default=None)}


def ray_session_if(wanted: bool, params):
    """Ray for the whole invocation when a side needs it (it is started once, not per round)."""
    if not wanted:
        return contextlib.nullcontext()
    from tasks.ray_cluster import ray_session

    return ray_session(params, "benchmark")


def steady_tokens_per_s(step_s: list[float], params, skip: int) -> float:
    """Median over steps after the warm-up, leaving out validation/checkpoint steps (a step n is 1-based)."""
    train = params.train
    steady = [t for n, t in enumerate(step_s, 1)
              if n > skip and n % train.val_every_steps and n % train.checkpoint_every_steps and n < len(step_s)]
    return params.train.global_batch_tokens / statistics.median(steady)


def gpu_1b_params(root: Path, steps: int, micro_batch: int, activation_checkpointing: bool, micro_steps: int = 1):
    """configs/tinyllama-1.1b.yaml on one GPU of this machine: world 1 with a 1 × 1 `train.mesh` (the 16-GPU
    run's HSDP code path at world size 1), `micro_steps` micro-batches of `micro_batch` rows per step,
    `steps` steps with one checkpoint two thirds in and one at the end, where the run's one milestone is
    (a sharded milestone is converted from its checkpoint); no evals, no `trainer` resource (the p4d nodes'
    label), paths under `root`."""
    import yaml

    from tasks.params import parse_params
    from tasks.ray_cluster import usable_cpus

    raw = yaml.safe_load((ROOT / "configs" / "tinyllama-1.1b.yaml").read_text())
    raw["paths"] = {"data": str(root / "data"), "models": str(root / "models"), "metrics": str(root / "metrics")}
    raw["data"]["rows_per_shard"] = 512
    tokens_per_step = micro_steps * micro_batch * raw["data"]["seq_len"]
    cpus = min(raw["train"]["cpus_per_worker"], usable_cpus())
    raw["train"].update(workers=1, mesh={"replicate": 1, "shard": 1}, micro_batch=micro_batch,
                        global_batch_tokens=tokens_per_step, activation_checkpointing=activation_checkpointing,
                        total_tokens=steps * tokens_per_step, milestones=[steps * tokens_per_step],
                        checkpoint_every_steps=max(1, 2 * steps // 3), val_every_steps=10**6,
                        log_every_steps=max(1, steps // 6), cpus_per_worker=cpus, threads_per_worker=cpus,
                        resources_per_worker={}, eval_milestones_during_training=False,
                        checkpoint_dir=str(root / "checkpoints"))
    return parse_params(raw, "1.1B benchmark params")


def gpu_figures(params, tokens_per_s: float, gpu_mem_peak_gib: float | None) -> dict:
    """MFU against the configured peak and the peak memory against `tinyllama plan`'s estimate for the same
    settings, for one side's steady tokens/s on the GPU."""
    from tasks.pretrain.plan import memory_per_gpu

    flops = params.llama_config().flops_per_token(params.data.seq_len) * tokens_per_s
    return {"mfu_vs_configured_peak": round(flops / (params.plan.peak_tflops_per_worker * 1e12), 3),
            "achieved_tflops": round(flops / 1e12, 1), "gpu_mem_peak_gib": gpu_mem_peak_gib,
            "plan_mem_gib": memory_per_gpu(params, params.llama_config().num_params())["total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="round pairs (bare, Ray), interleaved")
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the medians")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--gpu-1b", action="store_true", help="the 1.1B recipe on one GPU instead of the tiny preset")
    parser.add_argument("--sides", default="bare,ray", help="bare, ray or both (a machine without Ray: bare)")
    parser.add_argument("--micro-batch", type=int, default=4, help="--gpu-1b: rows per micro-step")
    parser.add_argument("--micro-steps", type=int, default=1, help="--gpu-1b: micro-steps per step (accumulation)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="--gpu-1b: recompute blocks")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "pretrain.json"))
    args = parser.parse_args()
    sides = args.sides.split(",")
    target = 0.95 if args.gpu_1b else 0.9
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        root = Path(tmp)
        params = (gpu_1b_params(root, args.steps, args.micro_batch, args.activation_checkpointing, args.micro_steps)
                  if args.gpu_1b else bench_params(root, args.steps, args.preset))
        write_data(params, root)
        rounds = []
        with ray_session_if("ray" in sides, params):
            for index in range(args.rounds):
                order = sides if index % 2 == 0 else sides[::-1]
                measured = {side: (bare_round(params, root, args.steps) if side == "bare" else ray_round(params, root))
                            for side in order}
                rate = {side: steady_tokens_per_s(m["step_s"], params, args.skip) for side, m in measured.items()}
                row = {"order": order, **{f"{side}_tokens_per_s": round(rate[side]) for side in order}}
                if len(order) == 2:
                    row["ratio"] = round(rate["ray"] / rate["bare"], 3)
                for side, m in measured.items():
                    row[f"{side}_peak_rss_mib"] = m["peak_rss_mib"]
                    if args.gpu_1b:
                        row[f"{side}_gpu"] = gpu_figures(params, rate[side], m["gpu_mem_peak_gib"])
                if "ray" in measured:
                    row.update(ray_tree_peak_rss_mib=measured["ray"]["peak_rss_tree_mib"],
                               ray_stage_wall_s=measured["ray"]["wall_s"])
                rounds.append(row)
                print(json.dumps(rounds[-1]), flush=True)
    result = {"model": "tinyllama-1.1b" if args.gpu_1b else args.preset, "steps": args.steps,
              "tokens_per_step": params.train.global_batch_tokens, "workers": params.train.workers,
              "threads_per_worker": params.train.threads_per_worker, "rounds": rounds}
    if args.gpu_1b:
        import torch

        result.update(device=torch.cuda.get_device_name(), torch=torch.__version__, micro_batch=args.micro_batch,
                      micro_steps=args.micro_steps, activation_checkpointing=args.activation_checkpointing,
                      anchor="24k tok/s/GPU, 56% MFU on A100-40G (312 TFLOP/s bf16)")
    if len(sides) == 2:
        ratio = statistics.median(r["ratio"] for r in rounds)
        result.update(ratio=ratio, target=target, target_met=ratio >= target)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
