"""The pipeline flow: every dvc.yaml stage, in order, each a Prefect task run through DVC.

Running a stage as `dvc repro --single-item <stage>` (flows/repro.py: DVC's own reproduce, without
the CLI's per-stage hints; not by calling the stage function) keeps DVC the judge of what is up to
date: the flow, `dvc repro` and `dvc exp run` share dvc.lock and the cache, so a flow run after a
`dvc repro` reruns nothing, and a stage that failed midway is the first one the next run redoes.
`python -m flows.pipeline --params FILE` is what `make run` calls.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.dag import Stage, load_stages
from flows.report import artifact_key, read_metrics, run_ids, run_link, stage_markdown, summary
from flows.repro import RAN, RESTORED, UP_TO_DATE
from flows.serve import SERVE_LOG, deploy_to_cluster, how_to_serve, start_local, url
from tasks.errors import UserError
from tasks.files import write_atomic
from tasks.params import Params, load_params
from tasks.tracking import tracking_uri

ACTIVE_PARAMS = "params.yaml"  # what every dvc.yaml cmd reads and DVC tracks
EPHEMERAL_STARTUP_S = 180      # Prefect's 20 s default is too short for 2 busy cores
BAD_INPUT_EXIT = 2             # a stage's exit code for bad input (UserError): retrying cannot help


class StageFailed(RuntimeError):
    """A stage's command exited non-zero; args stay (stage, returncode) so it pickles across processes."""

    def __init__(self, stage: str, returncode: int):
        super().__init__(stage, returncode)
        self.stage, self.returncode = stage, returncode

    def __str__(self) -> str:
        return f"stage {self.stage!r} failed: `dvc repro --single-item {self.stage}` exited {self.returncode}"


@dataclass
class StageResult:
    name: str
    ran: bool
    seconds: float = 0.0


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry crashes (a lost Ray worker, OOM) but not a stage's own bad-input exit."""
    error = state.result(raise_on_failure=False)
    return not (isinstance(error, StageFailed) and error.returncode == BAD_INPUT_EXIT)


def stage_env(ray_address: str | None) -> dict[str, str]:
    """The environment a stage runs in: this interpreter's bin dir first, Ray's address if given."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def _mlflow_links(params: Params, ids: list[str]) -> dict[str, str]:
    """Run id -> MLflow UI URL; the experiment id comes from the pipeline's tracking store."""
    if not ids:
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(params))
    links = {}
    for run_id in ids:
        try:
            experiment_id = client.get_run(run_id).info.experiment_id
        except Exception:  # a store that is unreachable must not fail a finished stage
            experiment_id = None
        links[run_id] = run_link(run_id, experiment_id)
    return links


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_retry_unless_bad_input, cache_policy=NO_CACHE,
      task_run_name="{stage.name}")
def run_stage(stage: Stage, root: str, ray_address: str | None, params: Params, sync_remote: bool = False
              ) -> StageResult:
    """`dvc repro --single-item` (with `--pull` and a push after it when `sync_remote`), its output streamed
    line by line into the task's log.

    No Prefect result cache: DVC decides what is up to date.
    """
    logger = get_run_logger()
    logger.info("$ dvc repro --single-item %s%s", "--pull " if sync_remote else "", stage.name)
    started, status = time.monotonic(), UP_TO_DATE
    command = [sys.executable, "-m", "flows.repro", stage.name, *(["--sync-remote"] if sync_remote else [])]
    with subprocess.Popen(command, cwd=root, env=stage_env(ray_address), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace") as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line in (RAN, UP_TO_DATE, RESTORED):
                status = line
            elif line:
                logger.info(line)
    if proc.returncode:
        raise StageFailed(stage.name, proc.returncode)
    seconds = round(time.monotonic() - started, 1)
    ran = status == RAN
    outcome = {RAN: f"done in {seconds:.0f} s", UP_TO_DATE: "up to date (DVC cache), nothing to rerun",
               RESTORED: "restored from the DVC remote's run cache, nothing to rerun"}[status]
    logger.info("%s: %s%s", stage.name, outcome, " (outputs and run cache pushed)" if sync_remote else "")
    root_path = Path(root)
    links = _mlflow_links(params, run_ids(read_metrics(root_path, stage)))
    create_markdown_artifact(markdown=stage_markdown(root_path, stage, ran, links), key=artifact_key(stage),
                             description=f"{stage.name}: metrics, tables and MLflow runs")
    return StageResult(stage.name, ran, seconds)


def check_cluster_profile(params: Params, ray_address: str | None) -> None:
    """What a run on a Ray cluster needs besides the cluster, checked before any stage runs (not at hour 40):
    - a shared MLflow store: milestone evals and exports log from other nodes, and a store on this machine's
      disk (the tiny profile's default sqlite file) would split its runs between nodes, or fail there;
    - shared storage (`paths.shared`): the shards every worker reads, and the model the replicas of the final
      `serve deploy` fetch (they run on other nodes than the one that resolved it)."""
    if not ray_address:
        return
    uri = tracking_uri(params)
    if "://" not in uri or uri.split(":", 1)[0] in ("sqlite", "file"):
        raise UserError(f"mlflow.tracking_uri: {uri} is on this machine's disk, and a run on a Ray cluster "
                        "(--ray-address) logs from every node; set MLFLOW_TRACKING_URI (or mlflow.tracking_uri) "
                        "to the shared MLflow server (README \"Scaling out\")")
    if not params.paths.shared:
        raise UserError("paths.shared: a run on a Ray cluster (--ray-address) needs storage every node reaches "
                        "(shards, eval cache, the served model), e.g. s3://<bucket>/pipeline")


def syncs_with_dvc_remote(root: Path, ray_address: str | None) -> bool:
    """Whether each stage restores from and pushes to DVC's default remote (flows/repro.py): on a cluster run
    with one set (the image's .dvc/config.local sets it), so a new head gets back what a lost one had made. A
    cluster run without one is allowed, and told what losing the head would cost."""
    if not ray_address:
        return False
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remote = repo.config["core"].get("remote")
    if not remote:
        print("warning: no default DVC remote, so dvc.lock and every stage's outputs (the prepared manifest, the "
              "milestones) stay on this head's disk only: a new head would prepare the corpus again. Set one "
              "(README \"DVC remote on S3\") and each stage pushes its outputs and run cache to it.")
    return bool(remote)


def activate_params(params_file: str | Path, params: Params, root: Path) -> None:
    """Make the chosen profile, validated in full (`params`), the workspace's params.yaml.

    Validation comes first so a bad file stops the run before any stage or any write. dvc.yaml
    reads params.yaml (as `dvc exp run -S` edits it), so another profile is copied onto it
    (atomically) and DVC sees exactly which values changed.
    """
    source, target = Path(params_file).resolve(), (root / ACTIVE_PARAMS).resolve()
    if source != target:
        write_atomic(target, source.read_bytes())
        print(f"params: {params_file} is now {ACTIVE_PARAMS}, the profile dvc.yaml tracks (profile {params.profile})")


@task(cache_policy=NO_CACHE)
def publish(params: Params, root: str, ray_address: str | None, keep_serving: bool,
            dashboard_address: str | None) -> str:
    """Leave the champion served (a cluster: `serve deploy`; here: a background `tinyllama serve`)
    or print the command that serves it (flows/serve.py)."""
    if ray_address:
        message = f"serving on the cluster at {deploy_to_cluster(params, Path(root), ray_address, dashboard_address)}"
    elif keep_serving:
        pid = start_local(params, Path(root))
        message = (f"serving at {url(params)} (pid {pid}, log {SERVE_LOG}); stop it with kill -TERM -- -{pid}")
    else:
        message = how_to_serve(params, Path(root))
    print(message)
    return message


@flow(name="tinyllama-pipeline", log_prints=True)
def pipeline(params: str = ACTIVE_PARAMS, ray_address: str | None = None, retries: int = 1,
             keep_serving: bool = False, dashboard_address: str | None = None) -> list[StageResult]:
    """Run the DAG in dvc.yaml on the profile `params`; `ray_address` points the stages at a Ray cluster
    (and deploys the champion there for good), `keep_serving` leaves it served on this machine."""
    root = Path.cwd()
    profile = load_params(params)
    check_cluster_profile(profile, ray_address)
    activate_params(params, profile, root)
    sync_remote = syncs_with_dvc_remote(root, ray_address)
    stages = load_stages(root)
    results = []
    for stage in stages:
        results.append(run_stage.with_options(retries=retries)(stage, str(root), ray_address, profile, sync_remote))
    print(summary(root, stages, results, tracking_uri(profile)))
    if any(stage.name == "deploy" for stage in stages):
        publish(profile, str(root), ray_address, keep_serving, dashboard_address)
    return results


def _patient_ephemeral_server():
    """Without PREFECT_API_URL, Prefect starts a throwaway server: give it time (unless the user chose),
    and no telemetry (its heartbeat competes for the throwaway sqlite database with the first flow run's
    writes and prints a "database is locked" traceback when it loses)."""
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    settings = {}
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ:
        settings[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = EPHEMERAL_STARTUP_S
    if "PREFECT_SERVER_ANALYTICS_ENABLED" not in os.environ:
        settings[PREFECT_SERVER_ANALYTICS_ENABLED] = False
    return temporary_settings(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=ACTIVE_PARAMS, metavar="FILE", help="the profile (default: params.yaml)")
    parser.add_argument("--ray-address", default=None, help="a running Ray cluster (sets RAY_ADDRESS for the stages)")
    parser.add_argument("--retries", type=int, default=1, help="retries per stage after a crash (default: 1)")
    parser.add_argument("--keep-serving", action="store_true", help="leave the champion served on this machine")
    parser.add_argument("--dashboard-address", default=None,
                        help="the cluster's Ray dashboard for `serve deploy` (default: RAY_DASHBOARD_ADDRESS, "
                             "else the one the cluster registered)")
    args = parser.parse_args(argv)
    try:
        # fail in one line, before Prefect starts, on a bad profile or a cluster run without a shared MLflow
        check_cluster_profile(load_params(args.params), args.ray_address)
        with _patient_ephemeral_server():
            pipeline(params=args.params, ray_address=args.ray_address, retries=args.retries,
                     keep_serving=args.keep_serving, dashboard_address=args.dashboard_address)
    except UserError as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
