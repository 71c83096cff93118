"""Ray Train overhead of the pretrain stage: the stage's own loop under Ray Train (2 workers × 1
thread, DDP over gloo) against the same model, batch and optimizer in a bare single-process loop
(2 threads), in the same run. Target: ratio ≥ 0.85 once workers are up. Also peak RSS.

  .venv/bin/python benchmarks/pretrain.py                 # tiny profile model, 30 steps each
  .venv/bin/python benchmarks/pretrain.py --steps 8       # smoke run
  .venv/bin/python benchmarks/pretrain.py --gpu-1b        # 1.1B, one GPU, bf16, seq 2048 (bare loop only)

"Once workers are up" = the median step time of steady-state steps (the first `--skip` steps,
validation, checkpoint and milestone steps excluded on both sides), from the per-step
`tokens_per_s` the stage logs to MLflow. The stage's session rate (startup excluded, but
validation / checkpoints / exports included) is reported beside it.
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


def bench_params(root: Path, steps: int, preset: str):
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
                        checkpoint_dir=str(root / "checkpoints"))
    return parse_params(raw, "benchmark params")


def bare_loop(params, steps: int, threads: int, device: str = "cpu") -> list[float]:
    """Seconds per optimizer step of the same model / global batch / AdamW, one process."""
    import torch

    from model.llama import Llama
    from tasks.pretrain.parallel import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(params.seed)
    train = params.train
    config = params.llama_config()
    model = Llama(config).to(device)
    if train.compile:
        model.compile_blocks()
    optimizer = build_optimizer(model, train.lr, train.betas, train.eps, train.weight_decay)
    rows_per_step = train.global_batch_tokens // params.data.seq_len
    micro = train.micro_batch
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=train.precision == "bf16")
    times = []
    for _ in range(steps):
        rows = torch.randint(0, config.vocab_size, (rows_per_step, params.data.seq_len + 1), generator=generator)
        start = time.perf_counter()
        for chunk in rows.to(device).split(micro):
            with autocast:
                loss = model.loss(chunk)
            (loss / (rows_per_step // micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


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


def ray_loop(params, root: Path, skip: int) -> dict:
    from mlflow.tracking import MlflowClient

    from conftest import write_prepared
    from tasks.pretrain.run import pretrain
    from tasks.ray_cluster import ray_session

    config = params.llama_config()
    rows = 4 * params.train.total_tokens // params.data.seq_len  # enough for a few epochs' worth of variety
    write_prepared(root / "data", root / "models" / "tokenizer", {s.name: 1 + 2 * i for i, s in enumerate(params.data.sources)},
                   seq_len=params.data.seq_len, vocab_size=config.vocab_size, train_rows=rows,
                   val_rows=256, rows_per_shard=params.data.rows_per_shard)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    started = time.perf_counter()
    with ray_session(params), TreeRss() as rss:
        up = time.perf_counter() - started
        metrics = pretrain(params)
    history = MlflowClient().get_metric_history(metrics["mlflow_run_id"], "tokens_per_s")
    steady = [m.value for m in sorted(history, key=lambda m: m.step)
              if skip < m.step < metrics["steps"]]  # the last step validates, checkpoints and exports
    return {"steady_tokens_per_s": statistics.median(steady), "session_tokens_per_s": metrics["tokens_per_s"],
            "wall_s": round(time.perf_counter() - started, 1), "ray_init_s": round(up, 1),
            "peak_rss_tree_mib": rss.peak // 2**20, "peak_rss_worker_mib": rss.peak_worker // 2**20}


def gpu_1b(steps: int) -> dict:
    """The 1.1B recipe on one GPU: bare loop, bf16 autocast, seq 2048; tokens/s/GPU and MFU vs the anchor."""
    import torch

    from tasks.params import load_params

    params = load_params(ROOT / "configs" / "tinyllama-1.1b.yaml")
    params = params.model_copy(update={"train": params.train.model_copy(update={"micro_batch": 4})})
    times = bare_loop(params, steps, threads=8, device="cuda")
    steady = statistics.median(times[3:])
    tokens_per_s = params.train.global_batch_tokens / steady
    flops = params.llama_config().flops_per_token(params.data.seq_len) * tokens_per_s
    return {"device": torch.cuda.get_device_name(), "tokens_per_s_per_gpu": round(tokens_per_s),
            "mfu_vs_configured_peak": flops / (params.plan.peak_tflops_per_worker * 1e12),
            "achieved_tflops": flops / 1e12, "anchor": "24k tok/s/GPU, 56% MFU on A100-40G",
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the medians")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--gpu-1b", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "pretrain.json"))
    args = parser.parse_args()
    if args.gpu_1b:
        result = gpu_1b(args.steps)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
            params = bench_params(Path(tmp), args.steps, args.preset)
            bare_times = bare_loop(params, args.steps, threads=params.train.workers)
            bare_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            bare = params.train.global_batch_tokens / statistics.median(bare_times[args.skip:])
            ray = ray_loop(params, Path(tmp), args.skip)
        result = {"model": args.preset, "steps": args.steps, "tokens_per_step": params.train.global_batch_tokens,
                  "bare_tokens_per_s": round(bare), "bare_peak_rss_mib": bare_rss,
                  **{k: round(v) if isinstance(v, float) and v > 100 else v for k, v in ray.items()},
                  "ratio_steady": round(ray["steady_tokens_per_s"] / bare, 3),
                  "ratio_session": round(ray["session_tokens_per_s"] / bare, 3)}
        result["target_met"] = result["ratio_steady"] >= 0.85
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
