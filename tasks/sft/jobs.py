"""The jobs of an sft or dpo run: one per variant, with its data built and checked and its run named.

Every input of every variant is read and checked here (sources, bad fractions, the base milestone or
SFT model, the length policy) before anything is written, so bad input fails with exit 2 before any
training. A job's fingerprint covers what decides its trajectory (recipe, template, length policy,
data, starting weights, the shared optimiser knobs), so `--resume auto` finds exactly its earlier run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import UserError
from tasks.files import sha256_bytes, sha256_file, sha256_json
from tasks.layout import WEIGHTS_FILE, Layout
from tasks.params import DpoRecipe, Params, ScheduleParams, VariantParams

if TYPE_CHECKING:  # the data code imports torch: only once the stage's log is set up (tasks/logs.py)
    from tasks.sft.datasets import TrainingSet

KINDS = ("sft", "dpo")


@dataclass
class Job:
    kind: str
    variant: VariantParams
    start_dir: Path
    out_dir: Path
    data: TrainingSet
    data_bytes: bytes
    fingerprint: str = ""

    @property
    def recipe(self) -> ScheduleParams:
        """The job's optimisation recipe, validated into the type its worker reads (DPO: `DpoRecipe`)."""
        kind = DpoRecipe if self.kind == "dpo" else ScheduleParams
        return kind.model_validate(self._section.model_dump(include=set(kind.model_fields)))

    @property
    def _section(self) -> ScheduleParams:
        return self.variant.dpo if self.kind == "dpo" else self.variant

    def recipe_values(self) -> dict:
        """The job's own knobs (an SFT job's exclude its variant's DPO section and data sources)."""
        return self._section.model_dump(mode="json", exclude={"sources", "dpo"})

    @property
    def data_sha256(self) -> str:
        return sha256_bytes(self.data_bytes)

    @property
    def run_name(self) -> str:
        return f"{self.kind}-{self.variant.name}-{self.fingerprint[:16]}"


def start_dir(layout: Layout, variant: VariantParams, kind: str) -> Path:
    """The weights a job fine-tunes: SFT its base milestone, DPO its variant's SFT model."""
    from tasks.sft.datasets import where

    if kind == "sft":
        directory = layout.milestone_dir(variant.base)
        if not (directory / WEIGHTS_FILE).is_file():
            found = sorted(p.name for p in layout.pretrain_dir.glob("*") if (p / WEIGHTS_FILE).is_file())
            raise UserError(f"{where(variant)}.base: no milestone checkpoint at {directory} (milestones found: "
                            f"{', '.join(found) or 'none'}; run `tinyllama pretrain` first)")
    else:
        directory = layout.sft_dir(variant.name)
        if not (directory / WEIGHTS_FILE).is_file():
            raise UserError(f"{where(variant, True)}: no SFT model at {directory} (run `tinyllama sft` first)")
    return directory


def fingerprint(params: Params, job: Job) -> str:
    return sha256_json({"kind": job.kind, "seed": params.seed, "recipe": job.recipe_values(),
                        "template": job.variant.template, "max_length": job.variant.max_length,
                        "packing": job.variant.packing, "data_sha256": job.data_sha256,
                        "start_sha256": sha256_file(job.start_dir / WEIGHTS_FILE),
                        "train": {k: getattr(params.train, k) for k in ("precision", "grad_clip", "betas", "eps")}})


def plan_jobs(params: Params, layout: Layout, kind: str) -> list[Job]:
    """Every job of the stage with its data built and checked; nothing written."""
    from model.tokenizer import Tokenizer
    from tasks.sft.datasets import build
    from tasks.sft.loader import encode_arrays

    if params.sft is None:
        raise UserError("sft: the profile has no sft section (variants to align)")
    variants = [v for v in params.sft.variants if kind == "sft" or v.dpo is not None]
    jobs = []
    for variant in variants:
        start = start_dir(layout, variant, kind)
        data = build(params, variant, Tokenizer.load(start), dpo=kind == "dpo")
        out = layout.dpo_dir(variant.name) if kind == "dpo" else layout.sft_dir(variant.name)
        job = Job(kind, variant, start, out, data, encode_arrays(data.arrays))
        job.fingerprint = fingerprint(params, job)
        jobs.append(job)
    return jobs
