"""`tinyllama deploy`: the DAG's last stage. Serve the champion, check it, measure it, stop it.

1. resolve the model (`deploy.model`: a dir, a registry alias such as `models:/tinyllama-chat@champion`,
   or by default the last pretrain milestone) and write `{paths.models}/deploy/lineage.json`;
2. write `{paths.models}/deploy/serve_config.yaml`, the Serve config a cluster runs with
   `serve deploy` (binding `deploy.host`/`deploy.port`);
3. start a local Ray with its dashboard and hand the same config (on a free local port) to Ray's own
   `serve deploy`, so what is checked is exactly what a cluster runs;
4. check it with the `openai` client and measure it (tasks/deploy/check.py);
5. the gate (tasks/deploy/gate.py): lm-eval scores the served model through its API, and every
   log-likelihood must equal in-process scoring of the same weights (else exit 1, after writing the result);
6. write `metrics/serve.json` and the deploy MLflow run (tasks/deploy/mlflow_log.py), and
   shut Serve and Ray down. Keeping a server up is the flow's job (`tinyllama serve`, or `serve deploy`
   to a cluster), not a DVC stage's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model.devices import check_device
from tasks.deploy import check
from tasks.deploy.champion import resolve
from tasks.deploy.config import lineage, model_ref, serve_args, serve_config, write_yaml
from tasks.deploy.gate import GateFailed, run_gate, summary
from tasks.deploy.mlflow_log import log_run
from tasks.errors import UserError
from tasks.evaluate.tasksets import collect_tasks
from tasks.files import read_json, write_json_atomic
from tasks.layout import Layout
from tasks.params import Params, add_params_argument, load_params
from tasks.ray_cluster import free_port, usable_cpus
from tasks.tracking import tracking_uri

METRICS = "serve"  # metrics/serve.json
READY_TIMEOUT_S = 600


def add_arguments(parser) -> None:
    add_params_argument(parser)


def write_artifacts(params: Params) -> tuple[Path, dict]:
    """Resolve the model, write lineage.json and serve_config.yaml; returns (config path, config)."""
    uri = tracking_uri(params)
    ref = model_ref(params)
    directory = resolve(ref, uri, "deploy.model")
    layout = Layout.from_params(params)
    config = serve_config(params, serve_args(params, directory, layout.lineage_file, uri), params.deploy.host,
                          params.deploy.port)
    write_json_atomic(layout.lineage_file, lineage(ref, directory, uri))
    return write_yaml(layout.serve_config, config), config


def _serve_deploy(config: dict, dashboard_port: int, work: Path) -> None:
    """Ray's own `serve deploy` CLI on the config, against the local dashboard."""
    path = write_yaml(work / "serve_config.check.yaml", config)
    serve_cli = Path(sys.executable).parent / "serve"
    result = subprocess.run([str(serve_cli), "deploy", str(path), "--address", f"http://127.0.0.1:{dashboard_port}"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode:
        raise RuntimeError(f"serve deploy failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


def _local_copy(config: dict, port: int) -> dict:
    """The same application on this machine: one replica that fits its cores, on 127.0.0.1:`port`."""
    cores = usable_cpus()
    app = dict(config["applications"][0])
    app["args"] = {**app["args"], "cpus": min(app["args"]["cpus"], cores)}
    deployments = []
    for deployment in app["deployments"]:
        local = {k: v for k, v in deployment.items() if k != "autoscaling_config"}
        local.update(num_replicas=1,
                     ray_actor_options={**deployment["ray_actor_options"], "num_cpus": app["args"]["cpus"]})
        deployments.append(local)
    app["deployments"] = deployments
    return {**config, "http_options": {"host": "127.0.0.1", "port": port}, "applications": [app]}


def deploy(params: Params) -> dict:
    from tasks.deploy.ray_serve import serve_session, wait_healthy

    config_path, config = write_artifacts(params)
    try:
        check_device(params.deploy.device, "deploy.device")  # the local check serves here, on this machine's device
    except ValueError as exc:
        raise UserError(str(exc)) from None
    tasks = collect_tasks(params)  # the gate's tasks, checked before anything starts
    model_dir = Path(config["applications"][0]["args"]["model"])
    print(f"deploy: Serve config {config_path} (model {model_dir})", flush=True)
    api_key = None
    if params.deploy.api_key_env:
        api_key = os.environ.get(params.deploy.api_key_env)
        if not api_key:
            raise UserError(f"deploy.api_key_env: environment variable {params.deploy.api_key_env} is not set")
    port, dashboard_port = free_port(), free_port()
    local = _local_copy(config, port)
    base_url = f"http://127.0.0.1:{port}"
    layout = Layout.from_params(params)
    # the gate serves a local copy on this machine's own Ray, even in a stage run against a cluster
    # (RAY_ADDRESS): its dashboard is the one `serve deploy` is pointed at, and the copy binds 127.0.0.1
    with serve_session(usable_cpus(), "127.0.0.1", port, dashboard_port, local=True), \
            tempfile.TemporaryDirectory(prefix="tinyllama-gate-") as include_dir:
        start = time.monotonic()
        _serve_deploy(local, dashboard_port, config_path.parent)
        wait_healthy(f"{base_url}/health", READY_TIMEOUT_S)
        ready_s = time.monotonic() - start
        print(f"deploy: ready in {ready_s:.1f} s at {base_url}; checking with the openai client", flush=True)
        checks = check.smoke(f"{base_url}/v1", api_key, params.deploy.check_max_tokens)
        model = checks["model"]
        ttft = check.time_to_first_token(f"{base_url}/v1", api_key, model)
        rates = {str(c): round(check.tokens_per_second(f"{base_url}/v1", api_key, model, c,
                                                        params.deploy.check_max_tokens), 1) for c in (1, 8)}
        print(f"deploy: the gate: lm-eval through the API against in-process scoring of {model_dir}", flush=True)
        gate = run_gate(params, tasks.write(Path(include_dir)), f"{base_url}/v1", api_key, model, model_dir,
                        read_json(layout.lineage_file))
    metrics = {"model_ref": model_ref(params), "serve_config": str(config_path), "time_to_ready_s": round(ready_s, 2),
               "ttft_s": round(ttft, 4), "tokens_per_s": rates, "checks": checks, "gate": gate}
    metrics_file = layout.metrics_file(METRICS)
    write_json_atomic(metrics_file, metrics)
    metrics["mlflow_run_id"] = log_run(params, metrics, [metrics_file, config_path, layout.lineage_file])
    write_json_atomic(metrics_file, metrics)
    print(f"deploy: time to ready {ready_s:.1f} s, TTFT {ttft * 1000:.0f} ms, tokens/s {rates['1']} (1 client), "
          f"{rates['8']} (8 clients) -> {metrics_file}", flush=True)
    print(f"deploy: {summary(gate)}", flush=True)
    if not gate["passed"]:
        raise GateFailed(f"the served model fails the gate: {gate['message']} (see {metrics_file})")
    return metrics


def main(args) -> int:
    from tasks.logs import adopt_library_logging, stage_log

    params = load_params(args.params)
    with stage_log("deploy", params):
        import ray.serve  # noqa: F401  (Ray and Serve attach their console handlers on import)

        adopt_library_logging("ray", "ray.serve")
        try:
            deploy(params)
        except check.CheckFailed as exc:  # the served model's fault, not the user's input: exit 1, one line
            print(f"tinyllama deploy: {exc}", file=sys.stderr)
            return 1
    return 0
