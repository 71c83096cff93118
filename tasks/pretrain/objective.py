"""What the one training loop optimises. Pretraining is here; SFT and DPO are in tasks/sft/objectives.py.

The loop (loop.py) owns what every run shares: Ray Train ranks, DDP / FSDP2, AdamW, gradient
accumulation and clipping, the learning-rate schedule, exact-resume checkpoints, progress lines,
MFU and MLflow. An objective supplies only what differs between pretraining, SFT and DPO:

  plan             steps, tokens per step, accumulation, and the token counts at which to `export`
  recipe           learning rate, its schedule, weight decay
  build_model      the starting weights (random for pretraining, a checkpoint to fine-tune from)
  loader           this rank's micro-batches of each step, resumable from `state()`
  val_batches      the fixed held-out micro-batches of this rank
  loss             a micro-batch's loss, plus extra metrics to average over the step (DPO's rewards)
  export           what to write when a milestone is reached (an HF dir, its MLflow artifacts)

An objective is a plain picklable object the driver builds and Ray ships to every worker; whatever
is heavy (data, a reference model) it loads on the worker.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model.llama import Llama
from tasks.params import Params, format_tokens
from tasks.pretrain.loader import MixedLoader, PreparedData, val_batches
from tasks.pretrain.schedule import StepPlan, lr_at

if TYPE_CHECKING:
    from tasks.evaluate.scoring import EvalInputs


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

    def export(self, trainer, milestone: int) -> None:
        raise NotImplementedError

    def collect_exports(self, trainer, wait: bool) -> None:
        """Between steps and at the end (`wait`): finish what exports left running in the background."""

    def busy_checkpoints(self) -> set[str]:
        """Checkpoints that exports running in the background still read (kept when old ones are pruned)."""
        return set()

    def resume_exports(self, trainer) -> None:
        """After a restore: restart the background exports the previous attempt did not finish."""


class PretrainObjective(Objective):
    """Next-token loss on the prepared shards, from random weights, milestones exported as they land
    (and, given `eval_inputs`, gathered by the driver, scored on Ray while training goes on)."""

    def __init__(self, data: PreparedData, eval_inputs: EvalInputs | None):
        self.data, self.eval_inputs = data, eval_inputs
        self._exports = None  # rank 0's background conversions (tasks/pretrain/export.py), made on the worker

    def plan(self, params: Params) -> StepPlan:
        return StepPlan.from_params(params)

    def total_tokens(self, params: Params) -> int:
        return params.train.total_tokens

    def recipe(self, params: Params) -> Recipe:
        train = params.train
        return Recipe(train.lr, train.min_lr, train.warmup_steps, train.weight_decay)

    def build_model(self, params: Params, device: torch.device) -> Llama:
        return Llama(params.llama_config(self.data.vocab_size)).to(device)

    def flops_per_token(self, model: Llama, params: Params) -> int:
        return model.config.flops_per_token(params.data.seq_len)

    def loader(self, params: Params, plan: StepPlan, rank: int, world: int) -> MixedLoader:
        return MixedLoader(self.data, params.seed, params.train.micro_batch, plan.grad_accum, rank, world)

    def val_batches(self, params: Params, rank: int, world: int) -> list:
        return val_batches(self.data, params.seed, params.train.micro_batch, params.train.val_batches, rank, world)

    def loss(self, parallel, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return parallel.loss(torch.from_numpy(batch).to(device, non_blocking=True)), {}

    def export(self, trainer, milestone: int) -> None:
        """The milestone into the run's dir (the stage copies it to {paths.models} at the end), logged to
        MLflow and handed to a milestone eval. Sharded (FSDP2): converted from this step's checkpoint by a Ray
        task rank 0 starts, no rank waiting for it (tasks/pretrain/export.py); MLflow gets the stored copy's
        URI, not a second upload. Full (DDP, small models): gathered and written by rank 0 at once."""
        from tasks.pretrain.checkpoint import checkpoint_name, export_milestone, milestone_uri

        name = format_tokens(milestone)
        metadata = {"milestone": name, "milestone_tokens": milestone, "tokens_seen": trainer.tokens_seen,
                    "step": trainer.step}
        run_uri = trainer.config.run_uri
        if trainer.train.strategy == "fsdp":
            if trainer.rank == 0:
                from tasks.pretrain.export import PendingExports

                self._exports = self._exports or PendingExports()
                self._exports.submit(run_uri, checkpoint_name(trainer.step), name, trainer.model.config.to_dict(),
                                     trainer.config.tokenizer_files, metadata)
            return
        local = export_milestone(trainer.model, run_uri, name, trainer.tokenizer_dir(), metadata)
        if local is None:
            return
        if trainer.mlflow is not None:
            trainer.mlflow.log_checkpoint(local, name)
        shutil.rmtree(local.parent, ignore_errors=True)
        self._exported(trainer, name, milestone_uri(run_uri, name), metadata)

    def busy_checkpoints(self) -> set[str]:
        return self._exports.checkpoints() if self._exports else set()

    def resume_exports(self, trainer) -> None:
        """After a restart (rank 0, sharded runs): milestones already passed whose background export died with
        the previous attempt are converted again from their checkpoints, if those are still kept."""
        if trainer.train.strategy != "fsdp" or trainer.rank != 0:
            return
        from tasks.pretrain.checkpoint import checkpoint_name, list_checkpoints, sealed_milestones
        from tasks.pretrain.export import PendingExports

        run_uri, plan = trainer.config.run_uri, trainer.plan
        sealed, kept = sealed_milestones(run_uri), set(list_checkpoints(run_uri))
        for milestone in plan.milestones:
            step, name = plan.milestone_step(milestone), format_tokens(milestone)
            if step > trainer.step or name in sealed:
                continue
            if checkpoint_name(step) not in kept:
                trainer.say(f"warning: milestone {name} was never exported and its checkpoint is gone")
                continue
            metadata = {"milestone": name, "milestone_tokens": milestone, "tokens_seen": plan.tokens_after(step),
                        "step": step}
            self._exports = self._exports or PendingExports()
            self._exports.submit(run_uri, checkpoint_name(step), name, trainer.model.config.to_dict(),
                                 trainer.config.tokenizer_files, metadata)

    def collect_exports(self, trainer, wait: bool) -> None:
        for name, uri, metadata in (self._exports.finished(wait) if self._exports else []):
            if trainer.mlflow is not None:
                trainer.mlflow.log_checkpoint_uri(uri, name)
            self._exported(trainer, name, uri, metadata)

    def _exported(self, trainer, name: str, uri: str, metadata: dict) -> None:
        """Rank 0, once milestone `name` is sealed at `uri`: say so and start its eval."""
        trainer.say(f"milestone {name}: exported {uri} at step {metadata['step']} "
                    f"({metadata['tokens_seen']} tokens seen)")
        if self.eval_inputs is not None:
            from tasks.evaluate.during_training import submit_milestone_eval

            config = trainer.config
            trainer.eval_refs.append(submit_milestone_eval(trainer.params, self.eval_inputs, uri, config.mlflow_run_id,
                                                           metadata["tokens_seen"], config.tracking_uri, config.console))
