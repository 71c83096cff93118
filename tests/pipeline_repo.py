"""Clean copies of this repo for end-to-end tests: what a fresh `git clone` would hold, run with DVC.

A copy has the tracked files plus untracked ones git does not ignore (work not yet committed),
never the pipeline's outputs, caches or stores; its `.venv` is a link to this repo's. It gets its
own git history (one commit) because `dvc exp` needs one. `PYTHONPATH` points at the copy so its
stages run the copy's code, not the editable install's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Never copied even when untracked and not ignored: outputs of an earlier run in this checkout.
NOT_SOURCE = ("data/", "models/", "metrics/", "mlflow/", "checkpoints/", "dvc.lock", ".dvc/cache/", ".dvc/tmp/")
FLOW_OUTPUT = "logs/make-run.log"  # where the shared run keeps what the flow printed (git-ignored)
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "tests", "GIT_AUTHOR_EMAIL": "tests@localhost",
                "GIT_COMMITTER_NAME": "tests", "GIT_COMMITTER_EMAIL": "tests@localhost"}


@dataclass
class PipelineRun:
    root: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    output: str = ""   # everything `python -m flows.pipeline` (what `make run` calls) printed


def env_for(root: Path) -> dict[str, str]:
    env = {**os.environ, **GIT_IDENTITY, "PYTHONPATH": str(root), "RAY_USAGE_STATS_ENABLED": "0",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = os.pathsep.join([str(ROOT / ".venv" / "bin"), env.get("PATH", "")])
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run(root: Path, *command: str, check: bool = True, timeout: float = 3600) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(root, sys.executable, "-m", "dvc", *args, check=check)


def git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run(root, "git", *args)


def run_repro(root: Path, *targets: str) -> subprocess.CompletedProcess:
    return dvc(root, "repro", *targets)


def source_files(repo: Path = ROOT) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sorted(p for p in listed if p and (repo / p).is_file() and not p.startswith(NOT_SOURCE))


def fresh_copy(dest: Path) -> Path:
    """A clean clone of the working tree at `dest`, committed once, ready for `dvc repro`."""
    for relative in source_files():
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    git(dest, "init", "-q", "-b", "main")
    (dest / ".git" / "info" / "exclude").write_text(".venv\n")  # a link: .gitignore's `.venv/` misses it
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "clean copy")
    return dest


# Parts of a finished workspace that no clone needs: logs, the run's Prefect home, DVC's state and locks (rebuilt).
NEVER_CLONED = ("logs", ".prefect", ".dvc/tmp")


def clone_workspace(source: Path, dest: Path, *, outputs: bool = True, dvc_cache: bool = True, mlflow: bool = True,
                    runs: bool = False) -> Path:
    """A copy of a workspace after a run to change freely: the source tree and git history, plus only the
    parts the test reads. `outputs`: data/, models/, metrics/, dvc.lock. `dvc_cache`: .dvc/cache, which a
    `dvc repro` there needs (an output missing from the cache counts as changed, so its stage would rerun).
    `mlflow`: the tracking store. `runs`: checkpoints/ (training runs' resume state, outside DVC)."""
    skipped = set(NEVER_CLONED)
    skipped |= set() if outputs else {"data", "models", "metrics", "dvc.lock"}
    skipped |= set() if dvc_cache else {".dvc/cache"}
    skipped |= set() if mlflow else {"mlflow"}
    skipped |= set() if runs else {"checkpoints"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        relative = Path(directory).relative_to(source)
        return {n for n in names if n in (".ray", "__pycache__") or (relative / n).as_posix() in skipped}

    shutil.copytree(source, dest, symlinks=True, ignore=ignore)
    return dest


@dataclass
class FlowInBackground:
    """The whole DAG running the way `make run` runs it, started by `start_flow`."""
    root: Path
    process: subprocess.Popen
    started: float


_running: list[FlowInBackground] = []  # the flows this process started and has not finished or stopped


def start_flow(root: Path, niceness: int = 0, **env: str) -> FlowInBackground:
    """Start the whole DAG the way `make run` runs it (the Prefect flow over dvc.yaml, a throwaway
    Prefect server with its own PREFECT_HOME) in its own process group, its console output going to
    `FLOW_OUTPUT`; `env` adds to its environment. A positive `niceness` gives the CPU to other work
    first (every process of the run inherits it): the group is in the caller's session, since on Linux a
    session of its own is a scheduling autogroup of its own, which gets an equal share whatever its nice
    value. `finish_flow` waits for it."""
    full_env = {**env_for(root), "PREFECT_HOME": str(root / ".prefect"), "PYTHONUNBUFFERED": "1", **env}
    full_env.pop("PREFECT_API_URL", None)
    (root / FLOW_OUTPUT).parent.mkdir(exist_ok=True)
    with (root / FLOW_OUTPUT).open("wb") as output:
        command = [sys.executable, "-m", "flows.pipeline", "--params", "params.yaml"]
        process = subprocess.Popen(["nice", "-n", str(niceness), *command], cwd=root,
                                   env=full_env, stdout=output, stderr=subprocess.STDOUT, process_group=0)
    flow = FlowInBackground(root, process, time.monotonic())
    _running.append(flow)
    return flow


def finish_flow(flow: FlowInBackground, timeout: float = 3600) -> PipelineRun:
    """Wait for a flow `start_flow` started: its console output and each stage's wall time, or an
    AssertionError with the output's tail if it failed."""
    try:
        returncode = flow.process.wait(timeout=max(1.0, flow.started + timeout - time.monotonic()))
    finally:
        stop_flow(flow)
    output = (flow.root / FLOW_OUTPUT).read_text(errors="replace")
    if returncode:
        raise AssertionError(f"the pipeline flow exited {returncode}\n{output[-8000:]}")
    finished = re.search(r"Pipeline finished: (.*)\.", output)
    seconds = dict(re.findall(r"(\w+) (\d+) s", finished.group(1))) if finished else {}
    return PipelineRun(flow.root, {name: float(s) for name, s in seconds.items()},
                       round(time.monotonic() - flow.started, 1), output)


def stop_flow(flow: FlowInBackground) -> None:
    """End a flow's whole process group if it still runs (a session cut short, a timeout)."""
    if flow.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flow.process.pid, signal.SIGKILL)
        flow.process.wait()
    if flow in _running:
        _running.remove(flow)


def background_pids() -> set[int]:
    """Every process of the flows still running in the background: what a test that finds processes
    to kill by their names (Ray's training or tokenizer workers) must leave alone."""
    import psutil

    pids = set()
    for flow in list(_running):
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(flow.process.pid)
            pids |= {parent.pid, *(child.pid for child in parent.children(recursive=True))}
    return pids
