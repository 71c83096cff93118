"""What a run tells its user: per-step metrics to MLflow, a progress line on the console, honest MFU.

MFU = achieved model FLOPs (6N + 12·L·d·T per token, `LlamaConfig.flops_per_token`) / peak FLOPs.
The peak is the *configured* `plan.peak_tflops_per_worker` on GPUs (312 TFLOP/s bf16 for an A100,
the anchor TinyLlama's 56% refers to) and a *measured* fp32 matmul rate on CPU workers: CPUs
have no honest datasheet number (clocks, AVX width and neighbours vary), so each run measures
what its worker threads can do (at start and again at every log interval, keeping the best, so a
reading taken while neighbours were busy cannot inflate MFU) and says so in its MLflow params.
"""

from __future__ import annotations

import time

import torch

from tasks.params import format_tokens

_PEAK_MATMUL_SIZE = 1024


def measure_cpu_peak_flops(seconds: float = 0.3) -> float:
    """fp32 matmul FLOP/s with this process's torch threads: the best of a few timed rounds."""
    a = torch.randn(_PEAK_MATMUL_SIZE, _PEAK_MATMUL_SIZE)
    b = torch.randn(_PEAK_MATMUL_SIZE, _PEAK_MATMUL_SIZE)
    a @ b  # warm up the kernels and the allocator
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * _PEAK_MATMUL_SIZE**3 / (time.perf_counter() - start))
    return best


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(step: int, total_steps: int, tokens: int, total_tokens: int, loss: float, lr: float,
                  tokens_per_s: float, mfu: float, eta_s: float) -> str:
    return (f"step {step}/{total_steps} | tokens {format_tokens(tokens) if tokens else 0}/"
            f"{format_tokens(total_tokens)} "
            f"| loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}% "
            f"| ETA {format_duration(eta_s)}")


class MlflowMetrics:
    """Buffers per-step metrics and sends them in one `log_batch` per log interval: one round trip
    per interval instead of one per metric per step, which matters against a remote tracking server."""

    def __init__(self, tracking_uri: str, run_id: str):
        from tasks.tracking import client

        self.client, self.run_id = client(tracking_uri), run_id
        self.pending = []

    def add(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(key, float(value), now, step) for key, value in metrics.items())

    def log_checkpoint(self, directory, milestone: str) -> None:
        """The milestone's HF dir as run artifacts (`checkpoints/<milestone>/`), so the MLflow UI lists
        every checkpoint beside the loss and eval curves of the run that produced it."""
        self.client.log_artifacts(self.run_id, str(directory), f"checkpoints/{milestone}")

    def log_checkpoint_uri(self, uri: str, milestone: str) -> None:
        """Where a milestone's HF dir is stored (the run's dir, e.g. on S3), as the run's tag
        `checkpoints/<milestone>`: MLflow references the one stored copy instead of uploading another."""
        self.client.set_tag(self.run_id, f"checkpoints/{milestone}", uri)

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # MLflow's per-request metric limit
            self.client.log_batch(self.run_id, metrics=self.pending[start:start + 1000])
        self.pending = []
