"""Steps, milestones and the warmup + cosine learning rate of the pretrain stage."""

import math
from pathlib import Path

import pytest

from tasks.params import load_params
from tasks.train.schedule import StepPlan, lr_at

ROOT = Path(__file__).resolve().parents[1]


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    warmup = [lr_at(s, **kw) for s in range(10)]
    assert warmup == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(0.5 * (1e-3 + 1e-4))  # halfway down the cosine
    decay = [lr_at(s, **kw) for s in range(10, 110)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(1e-4 + 0.45e-3 * (1 + math.cos(math.pi * 99 / 100)))
    assert lr_at(500, **kw) == pytest.approx(1e-4)  # past the end it stays at min_lr


def test_no_warmup_starts_at_peak():
    assert lr_at(0, lr=2e-3, min_lr=0.0, warmup_steps=0, total_steps=5) == pytest.approx(2e-3)


def test_milestone_steps_follow_the_contract_example():
    """The tiny profile's 100K milestone lands on the first step past it: step 25, 102,400 tokens seen."""
    plan = StepPlan.from_params(load_params(ROOT / "params.yaml"))
    assert plan.tokens_per_step == 4096
    step = plan.milestone_step(100_000)
    assert (step, plan.tokens_after(step)) == (25, 102_400)
    assert plan.milestones_reached(24, 25) == [100_000]
    assert plan.milestones_reached(25, 26) == []
    every = [m for s in range(plan.total_steps) for m in plan.milestones_reached(s, s + 1)]
    assert every == list(plan.milestones)  # each milestone exactly once, in order


def test_cluster_plan_matches_the_recipe():
    plan = StepPlan.from_params(load_params(ROOT / "configs" / "tinyllama-1.1b.yaml"))
    assert (plan.tokens_per_step, plan.grad_accum, plan.total_steps) == (2_097_152, 8, 1_430_512)
    assert plan.milestone_step(105_000_000_000) == 50_068


def test_linear_and_constant_shapes_after_the_same_warmup():
    kw = dict(lr=2e-5, min_lr=0.0, warmup_steps=2, total_steps=12)
    assert [lr_at(s, shape="linear", **kw) for s in (0, 1, 2, 7, 12)] == pytest.approx([1e-5, 2e-5, 2e-5, 1e-5, 0.0])
    assert [lr_at(s, shape="constant", **kw) for s in (0, 5, 11)] == pytest.approx([1e-5, 2e-5, 2e-5])
