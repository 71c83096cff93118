"""Where Ray work runs: an existing cluster (`RAY_ADDRESS`) or a local one sized explicitly.

Shared by the stages that use Ray (pretrain, evaluation). Locally Ray is started with an
explicit CPU count (the machine's cores plus `extra_cpus` logical slots, e.g. for milestone
evals that deliberately share cores with training) and a private temp dir, so concurrent runs
and test sessions never share Ray state. Requests are checked against what the cluster has
*before* anything is scheduled: Ray would otherwise wait forever for resources that never come.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

from tasks.errors import UserError
from tasks.params import Params

_started_temp_dirs: list[str] = []


def ensure_ray(params: Params, extra_cpus: int = 0) -> bool:
    """Connect to `RAY_ADDRESS` if set, else start a local Ray; no-op if Ray is already up in this
    process. Returns True when this call started (or connected) Ray, so the caller owns shutdown."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a pipeline stage must never prompt
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    # Short path on purpose: Ray's unix sockets live under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="tl-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    _started_temp_dirs.append(temp_dir)
    ray.init(num_cpus=(os.cpu_count() or 1) + extra_cpus, include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=True, configure_logging=True, logging_level="WARNING")
    return True


def shutdown_ray() -> None:
    import ray

    ray.shutdown()
    while _started_temp_dirs:
        shutil.rmtree(_started_temp_dirs.pop(), ignore_errors=True)


@contextmanager
def ray_session(params: Params, extra_cpus: int = 0):
    """`ensure_ray` for the duration of a block; shuts Ray down only if this block started it."""
    started = ensure_ray(params, extra_cpus)
    try:
        yield
    finally:
        if started:
            shutdown_ray()


def check_train_resources(params: Params) -> None:
    """Fail fast, with the numbers, when the cluster cannot place the training workers."""
    import ray

    train = params.train
    available = ray.cluster_resources()
    need_cpus = train.workers * train.cpus_per_worker
    have_cpus = available.get("CPU", 0)
    if need_cpus > have_cpus:
        raise UserError(f"train.workers: {train.workers} workers × {train.cpus_per_worker} CPUs "
                        f"(train.cpus_per_worker) = {need_cpus} CPUs, but the Ray cluster has {have_cpus:g}")
    if train.use_gpu and train.workers > available.get("GPU", 0):
        raise UserError(f"train.workers: {train.workers} GPU workers (train.use_gpu), but the Ray cluster has "
                        f"{available.get('GPU', 0):g} GPUs")
