"""After the DAG: leave the champion served, or say how to serve it (orchestration only).

Everything here goes through commands a user could type: the deploy stage has written the Serve
config and the lineage (which model it resolved), and
- on a Ray cluster, Ray's own `serve deploy` hands that config, its model published to shared storage
  first (the replicas run on other nodes), to the cluster's dashboard
  (`--dashboard-address`, else `RAY_DASHBOARD_ADDRESS`, else the address the cluster registered for its
  dashboard, asked of the cluster), where it stays up;
- on this machine, when asked to keep it running, `tinyllama serve` starts as a background process
  in its own session (stopped with SIGTERM to its process group, as the message says);
- otherwise the flow prints the one command that starts it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from tasks.errors import UserError
from tasks.files import read_json
from tasks.layout import Layout
from tasks.params import Params

SERVE_LOG = Path(".services") / "serve.log"
CLUSTER_SERVE_CONFIG = Path(".services") / "serve_config.cluster.yaml"  # what `serve deploy` sent to a cluster


# deploy's fields that `tinyllama serve` takes, and its flag for each (a bool field: the flag that sets it to the
# opposite of its default); the others are the cluster's (replicas) or the deploy stage's (gate, checks).
SERVE_FLAGS = {"draft": "--draft", "draft_tokens": "--draft-tokens", "quant": "--quant", "api_key_env": "--api-key-env",
               "slots": "--slots", "max_waiting": "--max-waiting", "cpus_per_replica": "--cpus", "device": "--device",
               "dtype": "--dtype", "compile": "--compile", "stream_interval": "--stream-interval",
               "prompt_cache": "--no-prompt-cache", "max_queued_requests": "--max-queued-requests",
               "retry_after_s": "--retry-after-s", "max_body_bytes": "--max-body-bytes",
               "max_prompt_tokens": "--max-prompt-tokens", "max_stop_chars": "--max-stop-chars",
               "max_top_logprobs": "--max-top-logprobs"}


def serve_command(params: Params, root: Path) -> list[str]:
    """The `tinyllama serve` command that serves what the profile's deploy section describes; a setting at its
    default is left out (the command's defaults are deploy's), so the tiny profile's command stays short."""
    deploy = params.deploy
    model = read_json(Layout.from_params(params, root).lineage_file, "written by the deploy stage")["model_ref"]
    command = [".venv/bin/tinyllama", "serve", "--model", model, "--host", deploy.host, "--port", str(deploy.port)]
    for field, flag in SERVE_FLAGS.items():
        value = getattr(deploy, field)
        if value != type(deploy).model_fields[field].get_default(call_default_factory=True):
            command += [flag] if isinstance(value, bool) else [flag, str(value)]
    return command


def url(params: Params, head: str = "127.0.0.1") -> str:
    """The API's URL; a proxy bound to every interface is reached through `head` (a cluster's head node)."""
    host = head if params.deploy.host in ("0.0.0.0", "::") else params.deploy.host
    return f"http://{host}:{params.deploy.port}/v1"


def dashboard_url(address: str) -> str:
    """The dashboard a running cluster registered for itself (the host and port its head bound, with a
    scheme), asked of the cluster at `address`. `serve deploy` otherwise assumes http://localhost:8265,
    and the 16-GPU runbook's head listens on its private IP, not on localhost."""
    import ray

    context = ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        url = context.address_info.get("webui_url")
    finally:
        ray.shutdown()
    if not url:
        raise UserError(f"the Ray cluster at {address} runs no dashboard, and `serve deploy` goes through it: "
                        "start the head with its dashboard (ray start --head --include-dashboard true)")
    return url if "://" in url else f"http://{url}"


def deploy_to_cluster(params: Params, root: Path, ray_address: str, dashboard_address: str | None) -> str:
    """`serve deploy` the stage's config to the cluster at `ray_address`, its model first published to
    shared storage for the replicas (`tinyllama publish`); returns the API URL."""
    address = dashboard_address or os.environ.get("RAY_DASHBOARD_ADDRESS") or dashboard_url(ray_address)
    tools = Path(sys.executable).parent
    subprocess.run([str(tools / "tinyllama"), "publish", "--out", str(CLUSTER_SERVE_CONFIG)],  # the active params.yaml
                   check=True, cwd=root)
    command = [str(tools / "serve"), "deploy", str(CLUSTER_SERVE_CONFIG), "--address", address]
    subprocess.run(command, check=True, cwd=root)
    return url(params, urlparse(address).hostname or "127.0.0.1")


def start_local(params: Params, root: Path) -> int:
    """`tinyllama serve` in the background, logging to .services/serve.log; returns its PID."""
    log = root / SERVE_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    command = serve_command(params, root)
    command[0] = str(Path(sys.executable).parent / "tinyllama")
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, cwd=root, stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid


def how_to_serve(params: Params, root: Path) -> str:
    return f"serve the champion: {shlex.join(serve_command(params, root))}  (OpenAI API at {url(params)})"
