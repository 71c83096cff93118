"""Where MLflow runs go: one place that picks the tracking store for every stage.

Default is a local store (sqlite file + local artifact dir) so the tiny profile needs no
server; `MLFLOW_TRACKING_URI` (or `mlflow.tracking_uri` in params) points elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tasks.params import Params

LOCAL_STORE_DIR = Path("mlflow")
# MLflow 3 opens an experiment in its GenAI view (traces, judges) unless told what kind it is; this tag
# (the one its UI reads) makes it open the model-training view: runs, metric charts, artifacts, models.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def local_tracking_uri(root: Path | None = None) -> str:
    root = (root or Path.cwd()) / LOCAL_STORE_DIR
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def tracking_uri(params: Params) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri or local_tracking_uri()


def _import_mlflow():
    """mlflow, its console handlers (installed on import) routed to the running stage's log file."""
    import mlflow

    from tasks.logs import adopt_library_logging

    adopt_library_logging("mlflow", "alembic", "huey", "sqlalchemy.engine")
    return mlflow


def client(uri: str):
    """An MlflowClient for `uri`: the one way stages talk to MLflow."""
    return _import_mlflow().MlflowClient(tracking_uri=uri)


def local_artifacts(uri: str) -> Path | None:
    """Where a sqlite store's artifacts go: beside its database file (for the default store, mlflow/artifacts).
    MLflow's own default, ./mlruns of whatever directory the process runs in, scatters one store's artifacts
    over every working directory that ever logged to it. None for a server, which places them itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).parent / "artifacts"


def configure_mlflow(params: Params) -> str:
    """Point mlflow at the profile's store and experiment; returns the experiment id."""
    mlflow = _import_mlflow()

    uri = tracking_uri(params)
    artifacts = local_artifacts(uri)
    if artifacts is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:
                mlflow.MlflowClient(uri).set_experiment_tag(experiment.experiment_id, key, value)
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = artifacts.resolve().as_uri() if artifacts is not None else None
    experiment_id = mlflow.create_experiment(params.mlflow.experiment, artifact_location=artifact_location,
                                             tags=EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts as dotted names, one entry per leaf: {"train": {"lr": 0.003}} -> {"train.lr": 0.003}. How
    a resolved config becomes MLflow params (`as_params`) and a metrics file becomes rows (flows/report.py)."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def as_params(values: dict) -> dict[str, str]:
    """A resolved config as MLflow params: `train.lr` -> "0.003", lists as JSON."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(values).items()}
