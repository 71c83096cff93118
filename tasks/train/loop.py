"""The per-worker training loop Ray Train runs on every rank (the `train_loop_per_worker`).

Determinism is a feature here, not an accident: the model is built from the same seed on every
rank (DDP also broadcasts rank 0's weights), the loader is a pure function of (seed, step, row
counts), the learning rate a pure function of the step, CPU kernels run with deterministic
algorithms, and a resume restores weights, AdamW moments, row counts and RNG bit for bit. So a run
that loses a worker and resumes ends with the same weights as one that never failed.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.params import Params
from tasks.ray_cluster import Console
from tasks.train.checkpoint import restore, save_checkpoint
from tasks.train.objective import ExportContext, Objective
from tasks.train.parallel import Parallel, build_optimizer, grad_norm_value
from tasks.train.telemetry import MlflowMetrics, measure_cpu_peak_flops, progress_line


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker (Ray pickles it in memory; nothing is read from a file)."""

    params: dict           # the resolved Params, re-validated on the worker
    objective: Objective   # what is optimised: pretraining, SFT or DPO (objective.py)
    run_uri: str           # the run's dir (checkpoints, milestones): a local path or a URI every node reaches
    tokenizer_files: dict[str, bytes]  # copied into every milestone; shipped, as workers may not see the driver's disk
    tracking_uri: str | None  # None: no MLflow (a bare benchmark run)
    mlflow_run_id: str
    peak_flops_per_worker: float | None  # configured (GPU) or None: measure (CPU)
    console: Console | None  # lines for the person watching the stage (progress, milestones, evals); None: print


@dataclass(frozen=True)
class Placement:
    """Where this worker sits: its rank, the world size, its device. Under Ray Train (the stage) or a bare
    torch.distributed process group (benchmarks/pretrain.py's baseline, a GPU machine without Ray)."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def from_ray(cls) -> Placement:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        return cls(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())

    @classmethod
    def from_process_group(cls, device: torch.device) -> Placement:
        return cls(dist.get_rank(), dist.get_world_size(), device)


def _mean_across_ranks(value: torch.Tensor) -> float:
    """All-reduced on the training device: an NCCL process group has no CPU backend."""
    value = value.detach().float().clone()
    dist.all_reduce(value)  # SUM: gloo has no AVG
    return value.item() / dist.get_world_size()


def deterministic_kernels(device: torch.device) -> None:
    """Deterministic algorithms for CPU training, not for CUDA. Set either way, because the flag is process-wide:
    left on by a CPU trainer, every cuBLAS call of a later CUDA trainer in the same process fails (deterministic
    cuBLAS demands CUBLAS_WORKSPACE_CONFIG)."""
    torch.use_deterministic_algorithms(device.type != "cuda")


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
        deterministic_kernels(self.device)
        self.objective = objective = config.objective
        self.plan = objective.plan(params)
        self.recipe = objective.recipe(params)

        torch.manual_seed(params.seed)
        self.model = objective.build_model(params, self.device)
        if train.compile and train.strategy == "fsdp":
            self.model.compile_blocks()  # FSDP2's per-block hooks would split a whole-model graph
        elif train.compile:
            self.model.compile_loss()
        mesh = (train.mesh.replicate, train.mesh.shard) if train.mesh else None
        self.parallel = Parallel(self.model, train.strategy, self.device, train.precision,
                                 train.activation_checkpointing, mesh=mesh)
        self.optimizer = build_optimizer(self.model, self.recipe.lr, train.betas, train.eps, self.recipe.weight_decay)
        self.loader = objective.loader(params, self.plan, self.rank, self.world)
        self.val = objective.val_batches(params, self.rank, self.world)
        self.flops_per_token = objective.flops_per_token(self.model, params)
        self.measure_peak = config.peak_flops_per_worker is None
        self.peak_flops = (config.peak_flops_per_worker or measure_cpu_peak_flops()) * self.world
        self.mlflow = (MlflowMetrics(config.tracking_uri, config.mlflow_run_id)
                       if self.rank == 0 and config.tracking_uri else None)
        self.eval_refs: list = []

        self._tokenizer: Path | None = None
        self.step, self.tokens_seen, self.metrics = 0, 0, {}
        record = restore(config.run_uri, self.model, self.optimizer, say=self.say)
        if record is not None:
            self.step, self.tokens_seen, self.metrics = record["step"], record["tokens_seen"], record["metrics"]
            self.loader.load_state(record["loader"])
            objective.resume_exports(self.export_context())

    # -- one optimizer step ----------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        train, plan = self.train, self.plan
        lr = self.recipe.lr_at(self.step, plan.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.loader.step_batches(self.step)
        loss_sum = torch.zeros((), device=self.device)
        extra_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            with self.parallel.accumulating(sync=i == len(batches) - 1):
                loss, extras = self.objective.loss(self.parallel, batch, self.device)
                (loss / len(batches)).backward()
            loss_sum += loss.detach()
            for key, value in extras.items():
                extra_sums[key] = extra_sums.get(key, 0) + value.detach()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = _mean_across_ranks(loss_sum / len(batches))
        # Objectives whose micro-batches are trimmed to their longest row count the positions they ran.
        positions = extra_sums.pop("positions", None)
        step_tokens = plan.tokens_per_step if positions is None else round(_mean_across_ranks(positions) * self.world)
        self.step += 1
        self.tokens_seen += step_tokens
        elapsed = time.perf_counter() - started
        tokens_per_s = step_tokens / elapsed
        metrics = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm_value(norm), "tokens_per_s": tokens_per_s,
                   "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
                   "tokens_seen": self.tokens_seen, "step_time_s": elapsed, "step_tokens": step_tokens,
                   **{key: _mean_across_ranks(value / len(batches)) for key, value in extra_sums.items()}}
        if self.device.type == "cuda":  # the figure to hold against `tinyllama plan`'s memory per GPU
            metrics["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    @torch.no_grad()
    def val_loss(self) -> float:
        total = torch.zeros((), device=self.device)
        for batch in self.val:
            total += self.objective.loss(self.parallel, batch, self.device)[0].float()
        self.parallel.reshard()
        return _mean_across_ranks(total / len(self.val))

    # -- milestones, checkpoints -----------------------------------------------------------------
    def export_context(self) -> ExportContext:
        """The loop's state and reporting an objective's export methods may use."""
        config, mlflow = self.config, self.mlflow
        return ExportContext(
            params=self.params, model=self.model, plan=self.plan, rank=self.rank, step=self.step,
            tokens_seen=self.tokens_seen, run_uri=config.run_uri, tokenizer_dir=self.tokenizer_dir(),
            say=self.say, tokenizer_files=config.tokenizer_files,
            log_checkpoint=mlflow.log_checkpoint if mlflow is not None else None,
            log_checkpoint_uri=mlflow.log_checkpoint_uri if mlflow is not None else None,
            wait_for=self.eval_refs.append, tracking_uri=config.tracking_uri, mlflow_run_id=config.mlflow_run_id,
            console=config.console)

    def tokenizer_dir(self) -> Path:
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
            state = {"step": self.step, "tokens_seen": self.tokens_seen,
                     "loader": self.loader.state(), "metrics": self.metrics}
            save_checkpoint(self.config.run_uri, self.step, self.model, self.optimizer, state,
                            sharded=self.train.strategy == "fsdp", keep=self.train.keep_checkpoints,
                            spare=frozenset(self.objective.busy_checkpoints()))
        ray.train.report(dict(self.metrics, step=self.step))

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        train, plan = self.train, self.plan
        first_step, first_tokens, loop_started = self.step, self.tokens_seen, time.perf_counter()
        window_tokens, window_time, window_loss = 0, 0.0, 0.0
        while self.step < plan.total_steps:
            metrics = self.train_step()
            milestones = plan.milestones_reached(self.step - 1, self.step)
            if self.step % train.val_every_steps == 0 or self.step == plan.total_steps:
                metrics["val_loss"] = self.val_loss()
                self.metrics["final_val_loss"] = metrics["val_loss"]
            self.metrics.update(final_train_loss=metrics["loss"], tokens=metrics["tokens_seen"], steps=self.step,
                                tokens_per_s=(self.tokens_seen - first_tokens) / (time.perf_counter() - loop_started))
            window_tokens += metrics["step_tokens"]
            window_time += metrics["step_time_s"]
            window_loss = metrics["loss"]
            if self.mlflow is not None:
                prefix = self.objective.metric_prefix
                self.mlflow.add({k if "/" in k else prefix + k: v for k, v in metrics.items()
                                 if k not in ("step_time_s", "step_tokens")}, step=self.step)
            if self.step % train.log_every_steps == 0 or self.step == plan.total_steps:
                self._log_progress(window_tokens, window_time, window_loss, metrics["lr"], first_step, loop_started)
                window_tokens, window_time = 0, 0.0
            # A milestone step is a checkpoint step: a sharded run's milestone is converted from that checkpoint.
            if milestones or self.step % train.checkpoint_every_steps == 0 or self.step == plan.total_steps:
                self.report(checkpoint=True)
            # Every rank calls export: a full-weight export gathers (a collective); a sharded pretrain run's
            # only has rank 0 submit a Ray task that converts the checkpoint, no rank waiting.
            for milestone in milestones:
                self.objective.export(self.export_context(), milestone)
            self.objective.collect_exports(self.export_context(), wait=False)
        if self.step == first_step:  # resumed a finished run: hand the driver its recorded metrics
            self.report(checkpoint=False)
        self.objective.collect_exports(self.export_context(), wait=True)
        self._wait_for_evals()

    def _log_progress(self, tokens: int, seconds: float, loss: float, lr: float, first_step: int,
                      loop_started: float) -> None:
        if self.rank != 0:
            return
        if self.mlflow is not None:
            self.mlflow.flush()
        if self.measure_peak:  # a CPU peak read while neighbours were busy would overstate MFU: keep the best seen
            self.peak_flops = max(self.peak_flops, measure_cpu_peak_flops(0.05) * self.world)
        tokens_per_s = tokens / max(seconds, 1e-9)
        done = self.step - first_step
        eta = (time.perf_counter() - loop_started) / done * (self.plan.total_steps - self.step)
        self.say(self.objective.label + progress_line(
            self.step, self.plan.total_steps, self.tokens_seen, self.objective.total_tokens(self.params), loss, lr,
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
