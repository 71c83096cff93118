"""Where Ray work runs: an existing cluster (`RAY_ADDRESS`) or a local one sized explicitly.

Shared by the stages that use Ray (pretrain and its milestone evals, alignment, deploy). Locally Ray
is started with an explicit CPU count (the cores this process may use plus `extra_cpus` logical slots, e.g. for
milestone evals that deliberately share cores with training), a private temp dir (concurrent runs and
test sessions never share Ray state) and its dashboard on a free local port: Ray's State API lives
there, and Ray Train's placement-group cleaner polls it every second (it warns each time it cannot).

Workers' output stays out of the stage's console (`log_to_driver=False`): it is kept, with Ray's own
logs, in `logs/<stage>-ray/`. What a person should see from a worker goes through a `Console`.
Requests are checked against what the cluster has *before* anything is scheduled: Ray would
otherwise wait forever for resources that never come.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.errors import UserError
from tasks.layout import Layout
from tasks.params import Params

_started_temp_dirs: list[str] = []
# Environment every Ray worker process gets: no progress bars (no terminal there).
WORKER_ENV = {"TQDM_DISABLE": "1"}
LOCAL_SYSTEM_CONFIG = {"prestart_worker_first_driver": False}
"""A local Ray's raylet starts one Python worker per CPU when the first driver connects. Our jobs carry a
runtime env (`WORKER_ENV`), and those workers ran none of their work: in the prepare stage's raylet log both
were disconnected unused ~2 s later, while the actors got workers of their own. Without them the stage
measured 12.9 instead of 13.9 CPU-seconds and 10.3 instead of 10.6 s (6 interleaved runs each)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a dashboard, a Serve proxy)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def usable_cpus() -> int:
    """The cores this process may use: its CPU affinity (taskset, a container's cpuset), capped by a cgroup v2
    CPU quota (`docker --cpus`). `os.cpu_count()` counts the host's cores and would oversubscribe both."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):  # no cgroup v2 CPU controller here: the affinity is the limit
        return cores
    return cores if quota == "max" else max(1, min(cores, int(quota) // int(period)))


def start_ray(cpus: int, dashboard_port: int | None = None, metrics_port: int | None = None,
              runtime_env: dict | None = None, local: bool = False) -> str | None:
    """Ray for this process, started the one way every command starts it: connected to `RAY_ADDRESS` when
    set (returns None), else a local Ray with exactly `cpus` CPUs and a private temp dir (returned: the
    caller removes it after `ray.shutdown()`), its dashboard on `dashboard_port` when given, Prometheus
    metrics on `metrics_port` (else a port Ray picks). `local`: a local Ray even when `RAY_ADDRESS` names a
    cluster (the deploy stage's gate serves on this machine, its own dashboard included)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a pipeline stage must never prompt
    address = os.environ.get("RAY_ADDRESS")
    if address and not local:
        ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=runtime_env)
        return None
    # Short path on purpose: Ray's unix sockets live under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="tl-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard_port is not None, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, _temp_dir=temp_dir, log_to_driver=False, configure_logging=False,
             runtime_env=runtime_env, _metrics_export_port=metrics_port, _system_config=LOCAL_SYSTEM_CONFIG)
    return temp_dir


def ensure_ray(params: Params, extra_cpus: int = 0, dashboard: bool = True) -> bool:
    """Connect to `RAY_ADDRESS` if set, else start a local Ray (with its dashboard: Ray Train's State API
    needs it); no-op if Ray is already up in this process. Returns True when this call started (or
    connected) Ray, so the caller owns shutdown. `dashboard=False` for a stage that needs neither the State
    API nor Ray Train (prepare): it starts faster."""
    import ray

    from tasks.logs import adopt_library_logging

    adopt_library_logging("ray")  # Ray installs its console handler when imported
    if ray.is_initialized():
        return False
    # The job's runtime env: every worker this job starts, on any node, gets these variables.
    runtime_env = {"env_vars": {**WORKER_ENV, **params.train.worker_env}}
    temp_dir = start_ray(usable_cpus() + extra_cpus, dashboard_port=free_port() if dashboard else None,
                         runtime_env=runtime_env)
    if temp_dir is not None:
        _started_temp_dirs.append(temp_dir)
    return True


def shutdown_ray(keep_logs_in: Path | None = None) -> None:
    """Stop Ray; the local session's logs (workers' stdout/stderr, Ray's own) are copied to `keep_logs_in`."""
    import ray

    ray.shutdown()
    while _started_temp_dirs:
        temp_dir = Path(_started_temp_dirs.pop())
        logs = temp_dir / "session_latest" / "logs"
        if keep_logs_in is not None and logs.is_dir():
            shutil.rmtree(keep_logs_in, ignore_errors=True)
            shutil.copytree(logs, keep_logs_in, ignore_dangling_symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_logs_dir(params: Params, stage: str) -> Path:
    return Layout.from_params(params).logs_dir / f"{stage}-ray"


@contextmanager
def ray_session(params: Params, stage: str, extra_cpus: int = 0, dashboard: bool = True) -> Iterator[None]:
    """`ensure_ray` for the duration of a block; shuts Ray down only if this block started it, keeping
    its logs in `logs/<stage>-ray/`."""
    started = ensure_ray(params, extra_cpus, dashboard)
    try:
        yield
    finally:
        if started:
            shutdown_ray(ray_logs_dir(params, stage))


class Console:
    """Lines for the person watching the stage, from any Ray worker or task: each line goes to the
    caller's own output (its log file) and to the driver, which prints it (`console_relay`)."""

    def __init__(self, lines):
        self._lines = lines  # a ray.util.queue.Queue: an actor every node reaches

    def say(self, line: str) -> None:
        print(line, flush=True)
        try:
            self._lines.put(line, timeout=10)
        except Exception:  # the stage's console is a courtesy: never fail training over it
            pass


@contextmanager
def console_relay() -> Iterator[Console]:
    """A `Console` for workers, and a driver thread that prints what they say until the block ends."""
    from ray.util.queue import Empty, Queue

    lines = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()

    def relay() -> None:
        while not stop.is_set():
            try:
                print(lines.get(timeout=0.5), flush=True)
            except (Empty, queue.Empty):
                continue
            except Exception:  # Ray going down underneath: nothing left to relay
                return

    thread = threading.Thread(target=relay, name="console-relay", daemon=True)
    thread.start()
    try:
        yield Console(lines)
    finally:
        stop.set()
        thread.join()
        while not lines.empty():
            print(lines.get_nowait(), flush=True)
        lines.shutdown()


def _with_evals(params: Params, milestone_evals: bool) -> bool:
    return milestone_evals and params.train.eval_milestones_during_training


def training_bundles(params: Params, milestone_evals: bool = True) -> list[dict[str, float]]:
    """What a training job asks of the cluster: one bundle per training worker, plus one for a milestone
    eval when pretraining scores milestones during training (one at a time: a milestone every few days
    at scale); SFT and DPO (`milestone_evals=False`) score after training."""
    train = params.train
    worker = {"CPU": float(train.cpus_per_worker), **({"GPU": 1.0} if train.use_gpu else {}),
              **train.resources_per_worker}
    bundles = [worker] * train.workers
    if _with_evals(params, milestone_evals):
        bundles.append(dict(params.eval.resources))
    return bundles


def _shortfall(params: Params, bundles: list[dict[str, float]], have: dict[str, float], milestone_evals: bool) -> str:
    """What is missing, resource by resource, and which params ask for it."""
    train = params.train
    need: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            need[name] = need.get(name, 0.0) + amount
    evals = " + eval.resources (milestone evals during training)" if _with_evals(params, milestone_evals) else ""
    missing = [f"{name} {amount:g} (has {have.get(name, 0):g})" for name, amount in sorted(need.items())
               if amount > have.get(name, 0)]
    asked = (f"train.workers {train.workers} × (train.cpus_per_worker {train.cpus_per_worker}"
             f"{', 1 GPU' if train.use_gpu else ''}"
             f"{', train.resources_per_worker ' if train.resources_per_worker else ''}"
             f"{train.resources_per_worker or ''})"
             f"{evals}")
    if missing:
        return f"the Ray cluster lacks {', '.join(missing)} for {asked}"
    return (f"the Ray cluster has enough of every resource in total but cannot place {asked} on its nodes "
            f"(one bundle per worker must fit on one node; "
            f"has {', '.join(f'{k} {v:g}' for k, v in sorted(have.items()))})")


def check_train_resources(params: Params, milestone_evals: bool = True) -> None:
    """Fail before training, saying what is missing, when the cluster cannot host the training workers
    *and* their milestone evals. All bundles are reserved at once as a placement group, as Ray Train does,
    so node packing counts, and an autoscaler sees the demand; it gets `train.resource_timeout_s` to
    provide them (no wait without a limit); the reservation is released at once."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = training_bundles(params, milestone_evals)
    group = placement_group(bundles, strategy="PACK")
    try:
        ready, _ = ray.wait([group.ready()], timeout=max(params.train.resource_timeout_s, 1.0))
    finally:
        remove_placement_group(group)
    if not ready:
        raise UserError(f"train.workers: {_shortfall(params, bundles, ray.cluster_resources(), milestone_evals)}; "
                        f"waited {max(params.train.resource_timeout_s, 1.0):g} s (train.resource_timeout_s)")
