"""The stage's MLflow record: one run linked to the source model's run, each GGUF a registered version.

The link is a tag (`source_run_id`) plus a note with the source run's id, so the UI leads from the
quantized files back to the training run; every GGUF is logged under the run's `gguf/` artifacts and
registered as a version of `quantize.registered_model` (default `tinyllama-chat-gguf`) tagged with
its type, so `models:/tinyllama-chat-gguf/<n>` names one exact file.
"""

from __future__ import annotations

from pathlib import Path

from tasks.params import Params
from tasks.tracking import client, configure_mlflow, tracking_uri

MEASURES = ("size_bytes", "ppl", "ppl_ratio", "kld", "same_top", "rms_dp", "eval_avg")


def check_source_run(params: Params, run_id: str | None) -> None:
    """A lineage run id that is not in the store is bad input (caught before any work)."""
    if not run_id:
        return
    from mlflow.exceptions import MlflowException

    from tasks.errors import UserError

    try:
        client(tracking_uri(params)).get_run(run_id)
    except MlflowException:
        raise UserError(f"quantize.source: its MLflow run {run_id} is not in {tracking_uri(params)}") from None


def log_run(params: Params, metrics: dict, files: list[Path], ggufs: dict[str, Path], register: bool) -> str:
    """Log the run (params, per-type metrics, reports, GGUF files); register the GGUFs if `register`.
    Returns the run id."""
    import mlflow

    experiment_id = configure_mlflow(params)
    source = metrics["source"]
    tags = {"stage": "quantize", "source": source["source"]}
    if source.get("mlflow_run_id"):
        tags["source_run_id"] = source["mlflow_run_id"]
        tags["mlflow.note.content"] = (f"Quantized from `{source['source']}`, the model of run "
                                       f"`{source['mlflow_run_id']}`.")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"quantize-{metrics['name']}", tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_params({"source": source["source"], "types": ",".join(metrics["types"]),
                           "n_ctx": metrics["n_ctx"], "val_chunks": metrics["chunks"]})
        mlflow.log_metrics({f"quantize/{name}/{key}": float(row[key]) for name, row in metrics["types"].items()
                            for key in MEASURES if row.get(key) is not None})
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="quantize")
        for path in ggufs.values():
            mlflow.log_artifact(str(path), artifact_path="gguf")
        mlflow.set_tag("gates_passed", str(metrics["gates_passed"]).lower())
    if register:
        _register(client(tracking_uri(params)), params.quantize.registered_model, run_id, metrics, ggufs)
    return run_id


def _register(mlflow_client, model_name: str, run_id: str, metrics: dict, ggufs: dict[str, Path]) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(model_name)
    except MlflowException:
        mlflow_client.create_registered_model(model_name, description="GGUF files for llama.cpp (tasks/quantize)")
    artifact_uri = mlflow_client.get_run(run_id).info.artifact_uri
    for qtype, path in ggufs.items():
        row = metrics["types"][qtype]
        tags = {"type": qtype, "source": metrics["source"]["source"], "file": path.name,
                "ppl_ratio": f"{row['ppl_ratio']:.6f}", "same_top": f"{row['same_top']:.6f}"}
        mlflow_client.create_model_version(model_name, source=f"{artifact_uri}/gguf/{path.name}", run_id=run_id,
                                           tags=tags, description=f"{metrics['name']} as {qtype}")
