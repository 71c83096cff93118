"""What the one training loop optimises: the interface every objective implements.

The loop (loop.py) owns what every run shares: Ray Train ranks, DDP / FSDP2, AdamW, gradient
accumulation and clipping, the learning-rate schedule, exact-resume checkpoints, progress lines,
MFU and MLflow. An objective supplies only what differs between pretraining
(tasks/pretrain/objective.py), SFT and DPO (tasks/sft/objectives.py):

  plan             steps, tokens per step, accumulation, and the token counts at which to `export`
  recipe           learning rate, its schedule, weight decay
  build_model      the starting weights (random for pretraining, a checkpoint to fine-tune from)
  loader           this rank's micro-batches of each step, resumable from `state()`
  val_batches      the fixed held-out micro-batches of this rank
  loss             a micro-batch's loss, plus extra metrics to average over the step (DPO's rewards)
  export           what to write when a milestone is reached (an HF dir, its MLflow artifacts), given
                   an `ExportContext`: the loop's state it may read, the reporting it may use
  collect_exports, busy_checkpoints, resume_exports
                   for objectives whose exports run in the background (sharded pretraining): finish
                   them between steps, keep the checkpoints they read, restart them after a restore

An objective is a plain picklable object the driver builds and Ray ships to every worker; whatever
is heavy (data, a reference model) it loads on the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.llama import Llama
from tasks.params import Params
from tasks.train.schedule import StepPlan, lr_at

if TYPE_CHECKING:
    from tasks.ray_cluster import Console


@dataclass(frozen=True)
class Recipe:
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    shape: str = "cosine"

    def lr_at(self, step: int, total_steps: int) -> float:
        return lr_at(step, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps, total_steps=total_steps,
                     shape=self.shape)


@dataclass(frozen=True)
class ExportContext:
    """What the objective's export methods get from the loop (every rank calls export: it is collective)."""

    params: Params
    model: Llama
    plan: StepPlan
    rank: int
    step: int
    tokens_seen: int
    run_uri: str                      # the run's dir: where milestones are written
    tokenizer_dir: Path               # the shipped tokenizer files, on this worker's disk
    say: Callable[[str], None]        # a line for the person watching the stage
    tokenizer_files: dict[str, bytes]  # the same files, to ship to a task that exports elsewhere
    log_checkpoint: Callable[[Path, str], None] | None  # (local dir, name) into the MLflow run; None off rank 0
    log_checkpoint_uri: Callable[[str, str], None] | None  # (stored copy's URI, name) into the MLflow run
    wait_for: Callable[[object], None]  # a Ray ObjectRef the worker waits for (bounded) before it ends
    tracking_uri: str | None
    mlflow_run_id: str
    console: Console | None


class Objective:
    """The interface (see the module docstring); `label` prefixes progress lines, `metric_prefix` the
    per-step MLflow metrics (metrics whose names already hold a '/', like DPO's `rewards/chosen`,
    keep their names)."""

    label = ""
    metric_prefix = ""

    def plan(self, params: Params) -> StepPlan:
        raise NotImplementedError

    def total_tokens(self, params: Params) -> int:
        plan = self.plan(params)
        return plan.tokens_after(plan.total_steps)

    def recipe(self, params: Params) -> Recipe:
        raise NotImplementedError

    def build_model(self, params: Params, device: torch.device) -> Llama:
        raise NotImplementedError

    def flops_per_token(self, model: Llama, params: Params) -> int:
        raise NotImplementedError

    def loader(self, params: Params, plan: StepPlan, rank: int, world: int):
        raise NotImplementedError

    def val_batches(self, params: Params, rank: int, world: int) -> list:
        raise NotImplementedError

    def loss(self, parallel, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def export(self, context: ExportContext, milestone: int) -> None:
        raise NotImplementedError

    def collect_exports(self, context: ExportContext, wait: bool) -> None:
        """Between steps and at the end (`wait`): finish what exports left running in the background."""

    def busy_checkpoints(self) -> set[str]:
        """Checkpoints that exports running in the background still read (kept when old ones are pruned)."""
        return set()

    def resume_exports(self, context: ExportContext) -> None:
        """After a restore: restart the background exports the previous attempt did not finish."""
