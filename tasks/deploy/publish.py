"""After the DAG: leave the champion served, or say how to serve it.

- on a Ray cluster: Ray's own `serve deploy` with the config the deploy stage wrote, to the cluster's
  dashboard (`RAY_DASHBOARD_ADDRESS`, or http://127.0.0.1:8265 on the head node), where it stays up;
- on this machine, when asked to keep it running: `tinyllama serve` as a background process in its
  own session (stop it with SIGTERM to its process group, as the message says);
- otherwise: the one command that starts it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from tasks.deploy.config import CONFIG_FILE, deploy_dir, model_ref, read_config
from tasks.params import Params

SERVE_LOG = Path(".services") / "serve.log"


def serve_command(params: Params) -> list[str]:
    deploy = params.deploy
    command = [".venv/bin/tinyllama", "serve", "--model", model_ref(params), "--host", deploy.host,
               "--port", str(deploy.port)]
    if deploy.draft:
        command += ["--draft", deploy.draft]
    if deploy.quant != "none":
        command += ["--quant", deploy.quant]
    if deploy.api_key_env:
        command += ["--api-key-env", deploy.api_key_env]
    return command


def url(params: Params) -> str:
    host = "127.0.0.1" if params.deploy.host in ("0.0.0.0", "::") else params.deploy.host
    return f"http://{host}:{params.deploy.port}/v1"


def deploy_to_cluster(params: Params, dashboard_address: str | None) -> str:
    """`serve deploy` the stage's config to a running cluster; returns the API URL."""
    config = deploy_dir(params) / CONFIG_FILE
    read_config(config)
    command = [str(Path(sys.executable).parent / "serve"), "deploy", str(config)]
    if dashboard_address:
        command += ["--address", dashboard_address]
    subprocess.run(command, check=True)
    return url(params)


def start_local(params: Params, root: Path) -> int:
    """`tinyllama serve` in the background, logging to .services/serve.log; returns its PID."""
    log = root / SERVE_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    command = serve_command(params)
    command[0] = str(Path(sys.executable).parent / "tinyllama")
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, cwd=root, stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid


def how_to_serve(params: Params) -> str:
    return f"serve the champion: {shlex.join(serve_command(params))}  (OpenAI API at {url(params)})"
