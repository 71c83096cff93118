"""The alignment set on the workers: epochs of seeded orders, disjoint ranks, resume from a count,
the data file checked by hash, and the SFT/DPO objectives' plans and batches."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.sft.loader import EpochLoader, encode_arrays, load_arrays


def _loader(rank=0, world=1, size=10, micro=2, accum=2, seed=3):
    return EpochLoader(size, lambda indices: indices, seed, micro, accum, rank, world)


def test_every_item_once_per_epoch_and_ranks_are_disjoint():
    ranks = [_loader(rank=r, world=2, size=16) for r in range(2)]
    seen = [np.concatenate([np.concatenate(loader.step_batches(step)) for loader in ranks]) for step in range(2)]
    assert sorted(np.concatenate(seen).tolist()) == list(range(16))  # 2 steps × 8 items = one epoch
    next_epoch = np.concatenate([np.concatenate(r.step_batches(2)) for r in ranks])
    assert len(set(next_epoch.tolist())) == 8


def test_resume_from_the_count_gives_the_same_batches():
    first = _loader()
    expected = [first.step_batches(step) for step in range(7)]
    resumed = _loader()
    resumed.load_state({"items": 4 * 3})
    assert resumed.state() == {"items": 12}
    for step in range(3, 7):
        assert all((a == b).all() for a, b in zip(resumed.step_batches(step), expected[step]))


def test_the_data_file_must_match_its_hash(tmp_path):
    import hashlib

    data = encode_arrays({"b": np.arange(4, dtype=np.int32), "a": np.ones((2, 3), np.int32)})
    path = tmp_path / "data.safetensors"
    path.write_bytes(data)
    arrays = load_arrays(str(path), hashlib.sha256(data).hexdigest())
    assert arrays["a"].shape == (2, 3) and arrays["b"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_arrays(str(path), "0" * 64)


def test_alignment_plans_follow_trl_recipe_knobs(tmp_path):
    from conftest import pretrain_params

    from tasks.params import DpoRecipe, ScheduleParams
    from tasks.sft.objectives import AlignmentJob, DpoObjective, SftObjective

    params = pretrain_params(tmp_path)  # 2 workers
    knobs = {"epochs": 3.0, "lr": 1e-3, "min_lr": 0.0, "schedule": "cosine", "warmup_ratio": 0.1,
             "weight_decay": 0.0, "batch_size": 8, "micro_batch": 2}
    job = AlignmentJob("sft", "v", "start", "data", "sha", items=37, row_length=64, packed=True,
                       recipe=ScheduleParams(**knobs), template="", stop_strings=())
    plan = SftObjective(job).plan(params)
    assert (plan.total_steps, plan.grad_accum, plan.tokens_per_step) == (14, 2, 8 * 64)  # ceil(3 × 37 / 8)
    assert plan.milestones == (14 * 8 * 64,)  # the one export, after the last step
    assert SftObjective(job).recipe(params).warmup_steps == 2  # ceil(0.1 × 14)
    dpo = DpoRecipe(**knobs, beta=0.2)
    pairs = DpoObjective(AlignmentJob("dpo", "v", "s", "d", "h", 20, 64, False, dpo, "", ()))
    assert pairs.plan(params).tokens_per_step == 8 * 2 * 64  # chosen and rejected
    assert pairs.job.recipe.beta == 0.2 and pairs.recipe(params).lr == knobs["lr"]


def test_a_job_carries_its_variants_recipe_typed_and_revalidated(tmp_path):
    """The recipe the driver validated is the one the worker reads, as its type: a DPO job's beta is an
    attribute of a DpoRecipe (a renamed field fails at the driver), and a pickled job (what Ray ships)
    keeps it."""
    import pickle

    from tasks.params import DpoRecipe, ScheduleParams, VariantParams
    from tasks.sft.jobs import Job

    variant = VariantParams.model_validate({
        "name": "v", "base": "1M", "sources": [{"name": "chat", "format": "builtin"}], "lr": 3e-4,
        "dpo": {"sources": [{"name": "prefs", "format": "builtin"}], "beta": 0.25, "loss_type": "ipo"}})
    sft, dpo = (Job(kind, variant, tmp_path, tmp_path, None, b"") for kind in ("sft", "dpo"))
    assert type(sft.recipe) is ScheduleParams and sft.recipe.lr == 3e-4
    shipped = pickle.loads(pickle.dumps(dpo.recipe))
    assert isinstance(shipped, DpoRecipe) and (shipped.beta, shipped.loss_type) == (0.25, "ipo")
    assert not hasattr(shipped, "sources")


def test_dpo_progress_total_is_the_positions_its_steps_run(tmp_path):
    """Pair micro-batches are trimmed to their longest pair: the progress line's total must be what the
    steps run (the sum the loop counts), not the plan's untrimmed tokens_per_step × steps."""
    from conftest import pretrain_params

    from tasks.params import DpoRecipe
    from tasks.sft.objectives import AlignmentJob, DpoObjective

    params = pretrain_params(tmp_path)  # 2 workers
    workers, items, length = params.train.workers, 21, 64
    recipe = {"epochs": 3.0, "lr": 1e-3, "min_lr": 0.0, "schedule": "cosine", "warmup_ratio": 0.1,
              "weight_decay": 0.0, "batch_size": 8, "micro_batch": 2}
    rng = np.random.default_rng(0)
    objective = DpoObjective(AlignmentJob("dpo", "v", "s", "d", "h", items, length, False, DpoRecipe(**recipe),
                                         "", ()))
    objective._arrays = {f"train_{kind}_{name}": np.zeros((items, length), np.int32)
                         for kind in ("chosen", "rejected") for name in ("inputs", "targets", "positions")}
    objective._arrays |= {f"train_{kind}_lengths": rng.integers(4, length, items).astype(np.int32)
                          for kind in ("chosen", "rejected")}
    plan = objective.plan(params)
    loaders = [objective.loader(params, plan, rank, workers) for rank in range(workers)]
    run = sum(batch["inputs"].size for step in range(plan.total_steps) for loader in loaders
              for batch in loader.step_batches(step))
    assert objective.total_tokens(params) == run < plan.total_steps * plan.tokens_per_step
