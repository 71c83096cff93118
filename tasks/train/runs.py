"""A training run's bookkeeping, shared by every training stage: the `--resume` flag, the run's dir
(continued or started over), the MLflow run it logs to, and what the workers are shipped.

A run's dir is `Layout.run_dir` (pretrain) or `Layout.alignment_run_dir` (SFT, DPO), named by a
fingerprint of what decides the trajectory; `RUN_FILE` names its MLflow run, `COMPLETE_FILE` is
written when it finished (tasks/layout.py holds both names).
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.files import exists, read_json, remove_tree
from tasks.layout import COMPLETE_FILE, RUN_FILE, TOKENIZER_FILES, join
from tasks.params import Params, add_params_argument

log = logging.getLogger("tinyllama.train")


def add_arguments(parser) -> None:
    """The flags of every training stage (pretrain, sft, dpo): `--params`, `--resume`."""
    add_params_argument(parser)
    parser.add_argument("--resume", choices=("auto", "never"), default="auto",
                        help="auto (default): continue this recipe's last run from its newest valid checkpoint "
                             "if it did not finish; never: discard it and start over")


def previous_run(run_uri: str, resume: str) -> tuple[dict | None, dict | None]:
    """(run.json, complete.json) of this recipe's earlier run when continuing it, (None, None) after
    clearing its dir when starting over (`--resume never`)."""
    if resume == "never":
        if exists(run_uri):
            log.warning("starting over in %s (--resume never)", run_uri)
        remove_tree(run_uri)
        return None, None
    record = read_json(join(run_uri, RUN_FILE)) if exists(join(run_uri, RUN_FILE)) else None
    complete = read_json(join(run_uri, COMPLETE_FILE)) if record and exists(join(run_uri, COMPLETE_FILE)) else None
    return record, complete


def start_mlflow_run(params: Params, run_name: str, previous: dict | None, extra: dict, tags: dict,
                     values: dict) -> tuple[str, str]:
    """The run a training job logs to: resumed when the previous attempt's run still exists, else a new
    one named `run_name` with `tags`, whose params are `values` flattened (`train.lr`), plus `extra`.
    Returns (tracking uri, run id)."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    from tasks.tracking import as_params, configure_mlflow, tracking_uri
    from tasks.tracking import client as mlflow_client

    experiment_id = configure_mlflow(params)
    uri = tracking_uri(params)
    client = mlflow_client(uri)
    if previous is not None:
        try:
            client.get_run(previous["mlflow_run_id"])
            client.update_run(previous["mlflow_run_id"], status="RUNNING")
            return uri, previous["mlflow_run_id"]
        except MlflowException:
            log.warning("MLflow run %s of the resumed run is gone; logging to a new run", previous["mlflow_run_id"])
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    flat = {**as_params(values), **{k: str(v) for k, v in extra.items()}}
    entries = [Param(k, v) for k, v in sorted(flat.items())]
    for start in range(0, len(entries), 100):  # MLflow's per-request param limit
        client.log_batch(run.info.run_id, params=entries[start:start + 100])
    return uri, run.info.run_id


def tokenizer_files(directory: Path) -> dict[str, bytes]:
    """The tokenizer files of a dir, shipped to the workers in memory (they may not see this disk)."""
    return {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}


def peak_flops_per_worker(params: Params) -> float | None:
    """The MFU denominator: configured for GPUs, None on CPU (each worker measures its matmul peak)."""
    return params.plan.peak_tflops_per_worker * 1e12 if params.train.use_gpu else None
