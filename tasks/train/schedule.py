"""How many steps, how many tokens each, when the milestones land, and the learning rate per step.

Everything here is a pure function of params, so the driver (to plan and fingerprint a run),
every worker (to train) and a resumed worker (to continue) agree without sharing state: the
"scheduler state" of a checkpoint is just its step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tasks.params import Params


@dataclass(frozen=True)
class StepPlan:
    tokens_per_step: int
    grad_accum: int
    total_steps: int
    milestones: tuple[int, ...]  # token counts, increasing

    @classmethod
    def from_params(cls, params: Params) -> StepPlan:
        tokens_per_step = params.train.global_batch_tokens
        return cls(tokens_per_step=tokens_per_step, grad_accum=params.grad_accum,
                   total_steps=math.ceil(params.train.total_tokens / tokens_per_step),
                   milestones=tuple(params.train.milestones))

    def tokens_after(self, steps: int) -> int:
        return steps * self.tokens_per_step

    def milestone_step(self, milestone_tokens: int) -> int:
        """The first step count whose tokens seen reach the milestone (`tinyllama plan` uses the same rule)."""
        return math.ceil(milestone_tokens / self.tokens_per_step)

    def milestones_reached(self, steps_before: int, steps_after: int) -> list[int]:
        """Milestones first reached by the steps in (steps_before, steps_after]."""
        return [m for m in self.milestones if steps_before < self.milestone_step(m) <= steps_after]


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int, shape: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr` over `warmup_steps`
    steps, then from `lr` down to `min_lr` at `total_steps`: a half cosine (TinyLlama / nanoGPT, and
    TRL's default for SFT and DPO), a straight line (`linear`), or not at all (`constant`)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or shape == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if shape == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
