"""Pretraining as an objective of the one training loop (tasks/train/objective.py)."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import torch

from model.llama import Llama
from tasks.params import Params, format_tokens
from tasks.pretrain.loader import MixedLoader, PreparedData, val_batches
from tasks.train.objective import ExportContext, Objective, Recipe
from tasks.train.schedule import StepPlan

if TYPE_CHECKING:
    from tasks.evaluate.scoring import EvalInputs


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

    def export(self, context: ExportContext, milestone: int) -> None:
        """The milestone into the run's dir (the stage copies it to {paths.models} at the end), logged to
        MLflow and handed to a milestone eval. Sharded (FSDP2): converted from this step's checkpoint by a Ray
        task rank 0 starts, no rank waiting for it (tasks/pretrain/export.py); MLflow gets the stored copy's
        URI, not a second upload. Full (DDP, small models): gathered and written by rank 0 at once."""
        from tasks.train.checkpoint import export_milestone, milestone_uri

        name = format_tokens(milestone)
        metadata = {"milestone": name, "milestone_tokens": milestone, "tokens_seen": context.tokens_seen,
                    "step": context.step}
        if context.params.train.strategy == "fsdp":
            if context.rank == 0:
                self._submit_export(context, context.step, name, metadata)
            return
        local = export_milestone(context.model, context.run_uri, name, context.tokenizer_dir, metadata)
        if local is None:
            return
        if context.log_checkpoint is not None:
            context.log_checkpoint(local, name)
        shutil.rmtree(local.parent, ignore_errors=True)
        self._exported(context, name, milestone_uri(context.run_uri, name), metadata)

    def busy_checkpoints(self) -> set[str]:
        return self._exports.checkpoints() if self._exports else set()

    def resume_exports(self, context: ExportContext) -> None:
        """After a restart, milestones already passed whose export died with the previous attempt. Sharded
        (rank 0): converted again from their checkpoints, if those are still kept. Full weights: see
        `_resume_full_export`."""
        if context.params.train.strategy != "fsdp":
            self._resume_full_export(context)
            return
        if context.rank != 0:
            return
        from tasks.train.checkpoint import checkpoint_name, list_checkpoints, sealed_milestones

        plan = context.plan
        sealed, kept = sealed_milestones(context.run_uri), set(list_checkpoints(context.run_uri))
        for milestone in plan.milestones:
            step, name = plan.milestone_step(milestone), format_tokens(milestone)
            if step > context.step or name in sealed:
                continue
            if checkpoint_name(step) not in kept:
                context.say(f"warning: milestone {name} was never exported and its checkpoint is gone")
                continue
            metadata = {"milestone": name, "milestone_tokens": milestone, "tokens_seen": plan.tokens_after(step),
                        "step": step}
            self._submit_export(context, step, name, metadata)

    def _resume_full_export(self, context: ExportContext) -> None:
        """Full weights (DDP): a milestone on the restored step that is not sealed (the previous attempt died
        between that step's checkpoint and its export) is exported now: the restored weights are that step's.
        A collective, so rank 0 decides (it reads the run's dir) and every rank joins. An earlier milestone
        cannot be missing: its export ran in its own step, before any later checkpoint."""
        import torch.distributed as dist

        from tasks.train.checkpoint import sealed_milestones

        plan = context.plan
        due = [m for m in plan.milestones if plan.milestone_step(m) == context.step]
        if not due:
            return
        missing = [[m for m in due if format_tokens(m) not in sealed_milestones(context.run_uri)]
                   if context.rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(missing, src=0)
        for milestone in missing[0]:
            self.export(context, milestone)

    def collect_exports(self, context: ExportContext, wait: bool) -> None:
        for name, uri, metadata in (self._exports.finished(wait) if self._exports else []):
            if context.log_checkpoint_uri is not None:
                context.log_checkpoint_uri(uri, name)
            self._exported(context, name, uri, metadata)

    def _submit_export(self, context: ExportContext, step: int, name: str, metadata: dict) -> None:
        """Rank 0: convert the sealed checkpoint of `step` into milestone `name` in a Ray task."""
        from tasks.pretrain.export import PendingExports
        from tasks.train.checkpoint import checkpoint_name

        self._exports = self._exports or PendingExports()
        self._exports.submit(context.run_uri, checkpoint_name(step), name, context.model.config.to_dict(),
                             context.tokenizer_files, metadata)

    def _exported(self, context: ExportContext, name: str, uri: str, metadata: dict) -> None:
        """Rank 0, once milestone `name` is sealed at `uri`: say so and start its eval."""
        context.say(f"milestone {name}: exported {uri} at step {metadata['step']} "
                    f"({metadata['tokens_seen']} tokens seen)")
        if self.eval_inputs is not None:
            from tasks.evaluate.during_training import submit_milestone_eval

            context.wait_for(submit_milestone_eval(context.params, self.eval_inputs, uri, context.mlflow_run_id,
                                                   metadata["tokens_seen"], context.tracking_uri, context.console))
