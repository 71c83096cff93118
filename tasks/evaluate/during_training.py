"""Evaluate a milestone on Ray the moment it lands, without blocking training.

The pretrain loop calls `submit_milestone_eval` and keeps going; the task runs on its own Ray
resources (one CPU on the tiny profile, where the cluster reserves a spare core for it; one GPU on
the cluster) and logs into the pretrain run with `step = tokens seen`. A failure never propagates:
the task tags the run `eval_failed/<milestone>` and returns a status, so a broken eval cannot kill
a multi-day pretraining run. The scores land in the cache the `evaluate` stage reads.
"""

from __future__ import annotations

import tempfile
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tasks.evaluate.scoring import EvalInputs
from tasks.layout import resolve, with_absolute_paths
from tasks.params import Params
from tasks.ray_cluster import Console


def eval_resources(params: Params) -> dict:
    """`eval.resources` as Ray task options (num_cpus, num_gpus, custom resources)."""
    asked = dict(params.eval.resources)
    cpus, gpus = asked.pop("CPU", 1.0), asked.pop("GPU", 0.0)
    return {"num_cpus": cpus, "num_gpus": gpus, **({"resources": asked} if asked else {})}


def run_milestone_eval(params: Params, inputs: EvalInputs, milestone_dir: str, run_id: str, tokens_seen: int,
                       uri: str, threads: int, say: Callable[[str], None] = print) -> dict:
    """The body of the Ray task (a plain function, so it is also callable in-process). `milestone_dir` is
    a sealed milestone in a run's dir (local or a URI), `inputs` what the driver gathered for scoring (the
    task runs wherever the cluster has eval.resources and reads no file of the driver's); `say` gets one
    line with the scores (or the failure)."""
    import torch

    from tasks.evaluate.checkpoints import read_milestone
    from tasks.evaluate.mlflow_log import client_for, mark_failed
    from tasks.evaluate.scoring import score_checkpoint
    from tasks.files import materialize_sealed
    from tasks.layout import MILESTONE_SEAL

    torch.set_num_threads(threads)
    client = client_for(uri)
    name = milestone_dir.rstrip("/").rsplit("/", 1)[-1]
    try:
        with tempfile.TemporaryDirectory(prefix="tinyllama-eval-") as scratch:
            local = materialize_sealed(milestone_dir, MILESTONE_SEAL, Path(scratch) / "milestone" / name)
            milestone = replace(read_milestone(local), tokens_seen=int(tokens_seen))
            name = milestone.name
            result = score_checkpoint(params, inputs, inputs.tasks.write(Path(scratch) / "tasks"), milestone)
        return _reported(client, run_id, result, say)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        mark_failed(client, run_id, name, error + "\n" + traceback.format_exc(limit=5))
        say(f"eval {name}: failed ({error}); the evaluate stage will retry it")
        return {"status": "failed", "milestone": name, "tokens": int(tokens_seen), "error": error}


def _reported(client, run_id: str, result: dict, say: Callable[[str], None]) -> dict:
    """A milestone's scores logged into the pretrain run and said on one line; the eval's return value."""
    from tasks.evaluate.mlflow_log import log_result
    from tasks.evaluate.report import result_line

    log_result(client, run_id, result)
    say(f"eval {result_line(result)}")
    return {"status": "ok", **result}


def cached_milestone_scores(inputs: EvalInputs, milestone_dir: str, tokens_seen: int) -> dict | None:
    """The scores of a sealed milestone whose weights the eval cache already holds, found from its seal
    alone (each file's sha256), or None. A rerun after a fault exports again the milestones an earlier
    attempt scored: the submitting worker logs their cached scores instead of starting a task that would hold
    `eval.resources` (a GPU on the cluster) and download the weights only to find them cached."""
    from tasks.errors import UserError
    from tasks.evaluate.checkpoints import sealed_weights_sha256
    from tasks.evaluate.scoring import cached_result
    from tasks.files import read_json
    from tasks.layout import MILESTONE_SEAL, WEIGHTS_INDEX_FILE, join

    try:
        seal = read_json(join(milestone_dir, MILESTONE_SEAL))
        weights = sealed_weights_sha256(seal["files"], lambda: read_json(join(milestone_dir, WEIGHTS_INDEX_FILE)))
    except (UserError, OSError, KeyError, TypeError):
        return None  # unreadable here: the task reads it again and reports what is wrong
    if weights is None:
        return None
    name = seal.get("milestone") or milestone_dir.rstrip("/").rsplit("/", 1)[-1]
    return cached_result(inputs, weights, name, int(tokens_seen))


def submit_milestone_eval(params: Params, inputs: EvalInputs, milestone_dir: str | Path, run_id: str,
                          tokens_seen: int, mlflow_uri: str, console: Console | None = None):
    """Start the eval as a Ray task with `eval.resources`; returns its ObjectRef (a dict with "status" once
    done). The line with the scores goes to `console` (the stage's), else to the task's own output. Scores
    already cached (`cached_milestone_scores`) are logged here, and the ref holds them at once."""
    import ray

    say = console.say if console is not None else print
    uri = resolve(milestone_dir)
    cached = cached_milestone_scores(inputs, uri, tokens_seen)
    if cached is not None:
        from tasks.evaluate.mlflow_log import client_for

        return ray.put(_reported(client_for(mlflow_uri), run_id, cached, say))
    resources = eval_resources(params)
    # max_calls=1: the worker process, whose priority the task lowers, exits with it.
    task = ray.remote(max_calls=1)(_background_milestone_eval).options(
        **resources, max_retries=0, name=f"eval-{uri.rstrip('/').rsplit('/', 1)[-1]}")
    return task.remote(params.train.eval_priority, with_absolute_paths(params), inputs, uri,
                       run_id, int(tokens_seen), mlflow_uri, max(1, int(resources["num_cpus"])), say)


def _background_milestone_eval(priority: str, *args) -> dict:
    """A milestone eval that must not slow the training it overlaps (issue: at most 10%); on the
    tiny profile training keeps every core busy. Under SCHED_IDLE the eval runs only when a core
    would otherwise idle, and a training worker that wakes up (say, for an all-reduce) takes the
    core back at once; nice 19 alone is not enough: it still delays those wake-ups (measured with
    two processes ping-ponging over a pipe beside a busy third one: nice 19 cost 32% of their
    rate, SCHED_IDLE nothing). The setting holds for this thread and the threads it starts."""
    import os

    if priority == "idle":
        if hasattr(os, "sched_setscheduler"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.nice(19)
    return run_milestone_eval(*args)
