"""`fit`: the one launcher of training on Ray Train, for every objective (pretraining, SFT, DPO)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from tasks.files import read_json
from tasks.layout import CHECKPOINT_FILE, join
from tasks.params import Params

if TYPE_CHECKING:  # torch: imported by the workers and once training starts, not by a stage's CLI
    from tasks.train.loop import LoopConfig

METRIC_KEYS = ("final_train_loss", "final_val_loss", "tokens", "steps", "tokens_per_s")


def last_checkpoint_metrics(run_uri: str) -> dict:
    """The metrics sealed into the run's newest checkpoint (the loop checkpoints its final step)."""
    from tasks.train.checkpoint import list_checkpoints

    newest = list_checkpoints(run_uri)[0]
    return read_json(join(run_uri, newest, CHECKPOINT_FILE))["metrics"]


def fit(params: Params, loop_config: LoopConfig) -> dict:
    """Train `loop_config.objective` with the one loop on Ray Train (TorchTrainer) in the run's dir
    `loop_config.run_uri`: `train.workers` workers, failures retried from the newest valid checkpoint.
    Returns the MLflow run id and the metrics sealed into the final checkpoint; when training failed for
    good (after `train.max_failures` restarts) it marks the MLflow run FAILED and raises."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasks.ray_cluster import training_bundles
    from tasks.tracking import client as mlflow_client
    from tasks.train.loop import train_loop

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every progress line prints twice
    train = params.train
    storage, name = loop_config.run_uri.rstrip("/").rsplit("/", 1)
    # One definition of a worker's resources: what check_train_resources reserved, `trainer` included.
    resources = training_bundles(params, milestone_evals=False)[0]
    trainer = TorchTrainer(
        lambda config: train_loop(config["loop"]), train_loop_config={"loop": loop_config},
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=train.max_failures)))
    try:
        trainer.fit()
        reported = last_checkpoint_metrics(loop_config.run_uri)
    except BaseException:
        mlflow_client(loop_config.tracking_uri).set_terminated(loop_config.mlflow_run_id, status="FAILED")
        raise
    return {"mlflow_run_id": loop_config.mlflow_run_id, **{k: reported.get(k) for k in METRIC_KEYS}}
