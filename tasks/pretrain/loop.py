"""The per-worker training loop Ray Train runs on every rank (the `train_loop_per_worker`).

Determinism is a feature here, not an accident: the model is built from the same seed on every
rank (DDP also broadcasts rank 0's weights), the loader is a pure function of (seed, step, row
counts), the learning rate a pure function of the step, CPU kernels run with deterministic
algorithms, and a resume restores weights, AdamW moments, row counts and RNG bit for bit. So a run
that loses a worker and resumes ends with the same weights as one that never failed.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from model.llama import Llama
from tasks.params import Params, format_tokens
from tasks.pretrain.checkpoint import export_milestone, milestone_uri, restore, save_checkpoint
from tasks.pretrain.loader import MixedLoader, PreparedData, val_batches
from tasks.pretrain.parallel import Parallel, build_optimizer, grad_norm_value
from tasks.pretrain.schedule import StepPlan, lr_at
from tasks.pretrain.telemetry import MlflowMetrics, measure_cpu_peak_flops, progress_line
from tasks.ray_cluster import Console

if TYPE_CHECKING:
    from tasks.evaluate.scoring import EvalInputs


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker (Ray pickles it in memory; nothing is read from a file)."""

    params: dict           # the resolved Params, re-validated on the worker
    data: PreparedData
    run_uri: str           # the run's dir (checkpoints, milestones): a local path or a URI every node reaches
    tokenizer_files: dict[str, bytes]  # copied into every milestone; shipped, as workers may not see the driver's disk
    tracking_uri: str | None  # None: no MLflow (a bare benchmark run)
    mlflow_run_id: str
    peak_flops_per_worker: float | None  # configured (GPU) or None: measure (CPU)
    eval_inputs: EvalInputs | None  # what milestone evals score with (gathered by the driver); None: no evals
    console: Console | None  # lines for the person watching the stage (progress, milestones, evals); None: print


@dataclass(frozen=True)
class Placement:
    """Where this worker sits: its rank, the world size, its device. Under Ray Train (the stage) or a bare
    torch.distributed process group (benchmarks/pretrain.py's baseline, a GPU machine without Ray)."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def from_ray(cls) -> "Placement":
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        return cls(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())

    @classmethod
    def from_process_group(cls, device: torch.device) -> "Placement":
        return cls(dist.get_rank(), dist.get_world_size(), device)


def _mean_across_ranks(value: torch.Tensor) -> float:
    """All-reduced on the training device: an NCCL process group has no CPU backend."""
    value = value.detach().float().clone()
    dist.all_reduce(value)  # SUM: gloo has no AVG
    return value.item() / dist.get_world_size()


class Trainer:
    def __init__(self, config: LoopConfig, placement: Placement):
        self.config = config
        self.params = params = Params.model_validate(config.params)
        self.train = train = params.train
        self.say = config.console.say if config.console is not None else print
        torch.set_num_threads(train.threads_per_worker)
        self.rank, self.world, self.device = placement.rank, placement.world, placement.device
        if self.device.type == "cuda":
            # object collectives (checkpoint hashes, RNG) use the current device
            torch.cuda.set_device(self.device.index if self.device.index is not None else torch.cuda.current_device())
        else:
            torch.use_deterministic_algorithms(True)
        self.plan = StepPlan.from_params(params)

        torch.manual_seed(params.seed)
        model_config = params.llama_config(config.data.vocab_size)
        self.model = Llama(model_config).to(self.device)
        if train.compile and train.strategy == "fsdp":
            self.model.compile_blocks()  # FSDP2's per-block hooks would split a whole-model graph
        elif train.compile:
            self.model.compile_loss()
        self.parallel = Parallel(self.model, train.strategy, self.device, train.precision,
                                 train.activation_checkpointing)
        self.optimizer = build_optimizer(self.model, train.lr, train.betas, train.eps, train.weight_decay)
        self.loader = MixedLoader(config.data, params.seed, train.micro_batch, self.plan.grad_accum, self.rank, self.world)
        self.val = [torch.from_numpy(b) for b in val_batches(config.data, params.seed, train.micro_batch,
                                                              train.val_batches, self.rank, self.world)]
        self.flops_per_token = model_config.flops_per_token(params.data.seq_len)
        self.measure_peak = config.peak_flops_per_worker is None
        self.peak_flops = (config.peak_flops_per_worker or measure_cpu_peak_flops()) * self.world
        self.mlflow = (MlflowMetrics(config.tracking_uri, config.mlflow_run_id)
                       if self.rank == 0 and config.tracking_uri else None)
        self.eval_refs: list = []

        self._tokenizer: Path | None = None
        self.step, self.metrics = 0, {}
        record = restore(config.run_uri, self.model, self.optimizer, say=self.say)
        if record is not None:
            self.step, self.metrics = record["step"], record["metrics"]
            self.loader.load_state(record["loader"])

    # -- one optimizer step ----------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        train, plan = self.train, self.plan
        lr = lr_at(self.step, lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_steps,
                   total_steps=plan.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.loader.step_batches(self.step)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            rows = torch.from_numpy(batch).to(self.device, non_blocking=True)
            with self.parallel.accumulating(sync=i == len(batches) - 1):
                loss = self.parallel.loss(rows)
                (loss / len(batches)).backward()
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = _mean_across_ranks(loss_sum / len(batches))
        self.step += 1
        elapsed = time.perf_counter() - started
        tokens_per_s = plan.tokens_per_step / elapsed
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm_value(norm), "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
                "tokens_seen": plan.tokens_after(self.step), "step_time_s": elapsed}

    @torch.no_grad()
    def val_loss(self) -> float:
        total = torch.zeros((), device=self.device)
        for batch in self.val:
            total += self.parallel.loss(batch.to(self.device)).float()
        self.parallel.reshard()
        return _mean_across_ranks(total / len(self.val))

    # -- milestones, checkpoints -----------------------------------------------------------------
    def export(self, milestone: int) -> None:
        """Collective: the milestone into the run's dir (the stage copies it to {paths.models} at the end),
        logged to MLflow and handed to a milestone eval."""
        name = format_tokens(milestone)
        metadata = {"milestone": name, "milestone_tokens": milestone,
                    "tokens_seen": self.plan.tokens_after(self.step), "step": self.step}
        local = export_milestone(self.model, self.config.run_uri, name, self._tokenizer_dir(), metadata)
        if local is None:
            return
        uri = milestone_uri(self.config.run_uri, name)
        self.say(f"milestone {name}: exported {uri} at step {self.step} ({metadata['tokens_seen']} tokens seen)")
        if self.mlflow is not None:
            self.mlflow.log_checkpoint(local, name)
        shutil.rmtree(local.parent, ignore_errors=True)
        if self.config.eval_inputs is not None:
            from tasks.evaluate.during_training import submit_milestone_eval

            self.eval_refs.append(submit_milestone_eval(self.params, self.config.eval_inputs, uri,
                                                        self.config.mlflow_run_id, metadata["tokens_seen"],
                                                        self.config.tracking_uri, self.config.console))

    def _tokenizer_dir(self) -> Path:
        """The shipped tokenizer files, written once into this worker's own temp dir."""
        if self._tokenizer is None:
            self._tokenizer = Path(tempfile.mkdtemp(prefix="tokenizer-"))
            for name, data in self.config.tokenizer_files.items():
                (self._tokenizer / name).write_bytes(data)
        return self._tokenizer

    def report(self, checkpoint: bool) -> None:
        """Every rank calls this: it writes its part of a checkpoint (collective) and reports the metrics
        to Ray Train (a barrier; the driver gets the last report's metrics)."""
        import ray.train

        if checkpoint:
            state = {"step": self.step, "tokens_seen": self.plan.tokens_after(self.step),
                     "loader": self.loader.state(), "metrics": self.metrics}
            save_checkpoint(self.config.run_uri, self.step, self.model, self.optimizer, state,
                            sharded=self.train.strategy == "fsdp", keep=self.train.keep_checkpoints)
        ray.train.report(dict(self.metrics, step=self.step))

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        train, plan = self.train, self.plan
        first_step, loop_started = self.step, time.perf_counter()
        window_tokens, window_time, window_loss = 0, 0.0, 0.0
        while self.step < plan.total_steps:
            metrics = self.train_step()
            for milestone in plan.milestones_reached(self.step - 1, self.step):
                self.export(milestone)
            if self.step % train.val_every_steps == 0 or self.step == plan.total_steps:
                metrics["val_loss"] = self.val_loss()
                self.metrics["final_val_loss"] = metrics["val_loss"]
            trained = self.step - first_step
            self.metrics.update(final_train_loss=metrics["loss"], tokens=metrics["tokens_seen"], steps=self.step,
                                tokens_per_s=plan.tokens_after(trained) / (time.perf_counter() - loop_started))
            window_tokens += plan.tokens_per_step
            window_time += metrics["step_time_s"]
            window_loss = metrics["loss"]
            if self.mlflow is not None:
                self.mlflow.add({k: v for k, v in metrics.items() if k != "step_time_s"}, step=self.step)
            if self.step % train.log_every_steps == 0 or self.step == plan.total_steps:
                self._log_progress(window_tokens, window_time, window_loss, metrics["lr"], first_step, loop_started)
                window_tokens, window_time = 0, 0.0
            if self.step % train.checkpoint_every_steps == 0 or self.step == plan.total_steps:
                self.report(checkpoint=True)
        if self.step == first_step:  # resumed a finished run: hand the driver its recorded metrics
            self.report(checkpoint=False)
        self._wait_for_evals()

    def _log_progress(self, tokens: int, seconds: float, loss: float, lr: float, first_step: int, loop_started: float) -> None:
        if self.rank != 0:
            return
        if self.mlflow is not None:
            self.mlflow.flush()
        if self.measure_peak:  # a CPU peak read while neighbours were busy would overstate MFU: keep the best seen
            self.peak_flops = max(self.peak_flops, measure_cpu_peak_flops(0.05) * self.world)
        tokens_per_s = tokens / max(seconds, 1e-9)
        done = self.step - first_step
        eta = (time.perf_counter() - loop_started) / done * (self.plan.total_steps - self.step)
        self.say(progress_line(
            self.step, self.plan.total_steps, self.plan.tokens_after(self.step), self.train.total_tokens, loss, lr,
            tokens_per_s, tokens_per_s * self.flops_per_token / self.peak_flops, eta))

    def _wait_for_evals(self) -> None:
        """Milestone evals are Ray tasks owned by this worker: they die with it, so the worker lingers
        (after training is done and checkpointed) until they finish, for at most `eval.timeout_s`; what
        is still running then is cancelled, and the evaluate stage scores it."""
        import ray

        refs = [ref for ref in self.eval_refs if isinstance(ref, ray.ObjectRef)]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=self.params.eval.timeout_s) if refs else ([], [])
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:  # an eval failure must not fail a finished pretraining run
                self.say(f"warning: a milestone evaluation failed: {exc}")
        for ref in pending:
            ray.cancel(ref, force=True)
        if pending:
            self.say(f"warning: {len(pending)} milestone eval(s) still running after eval.timeout_s = "
                     f"{self.params.eval.timeout_s:g} s were cancelled; the evaluate stage scores them")


def train_loop(config: LoopConfig) -> None:
    """What Ray Train runs on every worker."""
    Trainer(config, Placement.from_ray()).run()
