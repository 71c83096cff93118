"""SFT and DPO as objectives of the one training loop (tasks/train/objective.py).

Both fine-tune an HF dir (SFT: a pretraining milestone; DPO: the SFT result) on the set the driver
tokenized (`loader.DATA_FILE`), in `epochs` over it with TRL's recipe knobs (warmup as a ratio of the
steps, then cosine / linear / constant), and export the final weights as a chat model dir: the HF
dir plus the chat template it was trained with. Workers read only the run's dir, which every node
reaches: the driver publishes the starting weights there (sealed milestone `start`), the workers
publish the result there (sealed milestone `model`), and the driver fetches it.

- SFT: the masked next-token loss over the assistant tokens, on packed rows (block-diagonal
  attention, positions restarting per sequence) or padded ones.
- DPO: each micro-batch holds `micro_batch` pairs, chosen sequences first; the policy's and the
  frozen reference's (the SFT model) summed completion log-probabilities go into `dpo_losses`;
  TRL's reward metrics are averaged over the step's pairs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from model.llama import Llama
from tasks.params import DpoRecipe, Params, ScheduleParams
from tasks.sft.dpo_loss import preference_loss
from tasks.sft.loader import EpochLoader, load_arrays
from tasks.sft.rows import Rows
from tasks.train.objective import ExportContext, Objective, Recipe
from tasks.train.schedule import StepPlan

START_MILESTONE, MODEL_MILESTONE = "start", "model"  # sealed milestones of an SFT/DPO run's dir


@dataclass(frozen=True)
class AlignmentJob:
    """Everything a worker needs to run one SFT or DPO job (pickled by Ray with the objective)."""

    kind: str                 # "sft" | "dpo"
    variant: str
    start_uri: str            # the sealed weights to fine-tune (and DPO's reference), in the run's dir
    data_uri: str
    data_sha256: str
    items: int                # training rows (SFT) or pairs (DPO)
    row_length: int
    packed: bool
    recipe: ScheduleParams    # validated by the driver (DPO: a DpoRecipe); read by attribute, never by key
    template: str             # Jinja source
    stop_strings: tuple[str, ...]
    metadata: dict = field(default_factory=dict)


class AlignmentObjective(Objective):
    row_sets: tuple[str, ...] = ("",)  # the row sets an item spans in the data file (DPO: chosen, rejected)

    def __init__(self, job: AlignmentJob):
        self.job = job
        self.label = f"{job.kind} {job.variant}: "
        self.metric_prefix = f"{job.kind}/"
        self._arrays: dict[str, np.ndarray] | None = None
        self._total_tokens: int | None = None

    def plan(self, params: Params) -> StepPlan:
        recipe = self.job.recipe
        grad_accum = recipe.batch_size // (params.train.workers * recipe.micro_batch)
        total_steps = max(1, math.ceil(recipe.epochs * self.job.items / recipe.batch_size))
        tokens_per_step = recipe.batch_size * len(self.row_sets) * self.job.row_length
        return StepPlan(tokens_per_step=tokens_per_step, grad_accum=grad_accum, total_steps=total_steps,
                        milestones=(total_steps * tokens_per_step,))

    def recipe(self, params: Params) -> Recipe:
        recipe = self.job.recipe
        warmup = math.ceil(recipe.warmup_ratio * self.plan(params).total_steps)
        return Recipe(recipe.lr, recipe.min_lr, warmup, recipe.weight_decay, recipe.schedule)

    def _load_start(self, device: torch.device) -> Llama:
        """The starting weights, fetched (verified) from the run's dir into this worker's temp dir."""
        import tempfile
        from pathlib import Path

        from model.hf import load_hf
        from tasks.files import materialize_sealed
        from tasks.layout import MILESTONE_SEAL

        with tempfile.TemporaryDirectory(prefix="start-") as tmp:
            return load_hf(materialize_sealed(self.job.start_uri, MILESTONE_SEAL, Path(tmp) / "start"), device=device)

    def build_model(self, params: Params, device: torch.device) -> Llama:
        return self._load_start(device).train()

    def flops_per_token(self, model: Llama, params: Params) -> int:
        return model.config.flops_per_token(self.job.row_length)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = load_arrays(self.job.data_uri, self.job.data_sha256)
        return self._arrays

    def _rows(self, split: str) -> list[Rows]:
        return [Rows.from_arrays(self.arrays, f"{split}_{name}") for name in self.row_sets]

    def _length(self, rows: list[Rows], indices: np.ndarray) -> int:
        return max(1, max(int(r.lengths[indices].max()) for r in rows) if not self.job.packed else self.job.row_length)

    def total_tokens(self, params: Params) -> int:
        """The positions the planned steps run (what the progress line counts): padded micro-batches are
        trimmed to their longest item, so walk every rank's micro-batches of the run (lengths only, once)."""
        if self._total_tokens is None:
            plan, rows, world = self.plan(params), self._rows("train"), params.train.workers
            micro = self.job.recipe.micro_batch
            loaders = [EpochLoader(self.job.items, lambda i: len(rows) * len(i) * self._length(rows, i), params.seed,
                                   micro, plan.grad_accum, rank, world) for rank in range(world)]
            self._total_tokens = sum(sum(loader.step_batches(step)) for step in range(plan.total_steps)
                                     for loader in loaders)
        return self._total_tokens

    def _batch(self, rows: list[Rows], indices: np.ndarray) -> dict[str, np.ndarray]:
        """The selected items of each Rows stacked (DPO: chosen then rejected), trimmed to the longest."""
        length = self._length(rows, indices)
        return {name: np.concatenate([getattr(r, name)[indices, :length] for r in rows])
                for name in ("inputs", "targets", "positions")}

    def _val_indices(self, size: int, micro: int, rank: int, world: int) -> list[np.ndarray]:
        """The same number of micro-batches on every rank (each forward is a collective under DDP),
        wrapping around a small val set."""
        n_batches = max(1, size // (micro * world))
        flat = np.arange(n_batches * micro * world) % size
        return [flat[(b * world + rank) * micro:(b * world + rank + 1) * micro] for b in range(n_batches)]

    def loader(self, params: Params, plan: StepPlan, rank: int, world: int) -> EpochLoader:
        rows = self._rows("train")
        return EpochLoader(self.job.items, lambda indices: self._batch(rows, indices), params.seed,
                           self.job.recipe.micro_batch, plan.grad_accum, rank, world)

    def val_batches(self, params: Params, rank: int, world: int) -> list:
        rows = self._rows("val")
        size = len(rows[0])
        return [self._batch(rows, indices) for indices in
                self._val_indices(size, self.job.recipe.micro_batch, rank, world)]

    def _tensors(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(array).long().to(device, non_blocking=True) for name, array in batch.items()}

    def _positions(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The positions this micro-batch ran (rows trimmed to their longest differ from the plan's)."""
        return {} if self.job.packed else {"positions": torch.tensor(float(t["inputs"].numel()))}

    def export(self, context: ExportContext, milestone: int) -> None:
        import shutil

        from tasks.train.checkpoint import export_milestone, milestone_uri

        metadata = {**self.job.metadata, "step": context.step, self.job.kind + "_tokens": context.tokens_seen}
        local = export_milestone(context.model, context.run_uri, MODEL_MILESTONE, context.tokenizer_dir,
                                 metadata, chat_template=self.job.template, stop_strings=self.job.stop_strings)
        if local is not None:
            shutil.rmtree(local.parent, ignore_errors=True)
            context.say(f"{self.label}exported {milestone_uri(context.run_uri, MODEL_MILESTONE)} "
                        f"after {context.step} steps")


class SftObjective(AlignmentObjective):
    def loss(self, parallel, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = self._tensors(batch, device)
        positions = t["positions"] if self.job.packed else None  # padded rows: plain causal attention
        return parallel.loss(t["inputs"], t["targets"], positions=positions), self._positions(t)


class DpoObjective(AlignmentObjective):
    row_sets = ("chosen_", "rejected_")

    def __init__(self, job: AlignmentJob):
        super().__init__(job)
        self._reference: Llama | None = None

    def build_model(self, params: Params, device: torch.device) -> Llama:
        model = super().build_model(params, device)
        self._reference = copy.deepcopy(model).eval().requires_grad_(False)  # the start weights, fetched once
        return model

    def loss(self, parallel, batch, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = self._tensors(batch, device)
        recipe: DpoRecipe = self.job.recipe
        policy = parallel.call("token_logprobs", t["inputs"], t["targets"])
        dtype = parallel.autocast_dtype
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        with torch.no_grad(), autocast:
            reference = self._reference.token_logprobs(t["inputs"], t["targets"])
        loss, metrics = preference_loss(policy, reference, t["targets"], recipe.beta, recipe.loss_type,
                                        recipe.label_smoothing, recipe.rpo_alpha)
        return loss, metrics | self._positions(t)
