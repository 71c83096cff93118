"""Ray runtime-env hooks for the multi-node rehearsal (tests/test_cluster_rehearsal.py).

On a real cluster a worker on another node cannot see the driver's disk. On one machine it can, so the
rehearsal makes any such access fail loudly instead: every worker process of the job gets an audit hook
that refuses to open or list anything under the driver's workspace (`TINYLLAMA_DRIVER_WORKSPACE`).
`RAY_RUNTIME_ENV_HOOK=rehearsal_hooks.forbid_driver_workspace` makes Ray apply it to the job the stage
starts, exactly as the stage itself starts it.
"""

from __future__ import annotations

import os
import sys

WORKSPACE_VAR = "TINYLLAMA_DRIVER_WORKSPACE"
_WATCHED = ("open", "os.listdir", "os.scandir")


def forbid_driver_workspace(runtime_env: dict | None) -> dict:
    """RAY_RUNTIME_ENV_HOOK: the job's runtime env plus the audit hook and what it needs."""
    runtime_env = dict(runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars[WORKSPACE_VAR] = os.environ[WORKSPACE_VAR]
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    # The test's S3 server and its credentials (a real cluster's nodes have their own, e.g. instance roles).
    env_vars.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    runtime_env["env_vars"] = env_vars
    runtime_env["worker_process_setup_hook"] = "rehearsal_hooks.install_audit_hook"
    return runtime_env


def install_audit_hook() -> None:
    """worker_process_setup_hook: reading or writing the driver's workspace raises PermissionError."""
    forbidden = os.path.realpath(os.environ[WORKSPACE_VAR])

    def refuse(event: str, args: tuple) -> None:
        if event not in _WATCHED or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.fsdecode(args[0])
        if os.path.realpath(path).startswith(forbidden + os.sep) or os.path.realpath(path) == forbidden:
            raise PermissionError(f"a Ray worker touched the driver's local path {path} ({event}): "
                                  f"another node could not")

    sys.addaudithook(refuse)
