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
        MLflow and handed to a milestone eval."""
        from tasks.train.checkpoint import export_milestone, milestone_uri

        name = format_tokens(milestone)
        metadata = {"milestone": name, "milestone_tokens": milestone, "tokens_seen": context.tokens_seen,
                    "step": context.step}
        local = export_milestone(context.model, context.run_uri, name, context.tokenizer_dir, metadata)
        if local is None:
            return
        uri = milestone_uri(context.run_uri, name)
        context.say(f"milestone {name}: exported {uri} at step {context.step} "
                    f"({metadata['tokens_seen']} tokens seen)")
        if context.log_checkpoint is not None:
            context.log_checkpoint(local, name)
        shutil.rmtree(local.parent, ignore_errors=True)
        if self.eval_inputs is not None:
            from tasks.evaluate.during_training import submit_milestone_eval

            context.wait_for(submit_milestone_eval(context.params, self.eval_inputs, uri, context.mlflow_run_id,
                                                   metadata["tokens_seen"], context.tracking_uri, context.console))
