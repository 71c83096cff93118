"""Where MLflow runs go: one place that picks the tracking store for every stage.

Default is a local store (sqlite file + local artifact dir) so the tiny profile needs no
server; `MLFLOW_TRACKING_URI` (or `mlflow.tracking_uri` in params) points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.params import Params

LOCAL_STORE_DIR = Path("mlflow")


def local_tracking_uri(root: Path | None = None) -> str:
    root = (root or Path.cwd()) / LOCAL_STORE_DIR
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri or local_tracking_uri()


def configure_mlflow(params: Params) -> str:
    """Point mlflow at the profile's store and experiment; returns the experiment id."""
    import mlflow

    uri = tracking_uri(params)
    local = uri == local_tracking_uri()
    if local:
        (Path.cwd() / LOCAL_STORE_DIR / "artifacts").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = (Path.cwd() / LOCAL_STORE_DIR / "artifacts").resolve().as_uri() if local else None
    experiment_id = mlflow.create_experiment(params.mlflow.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
