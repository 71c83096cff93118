"""The deploy stage's MLflow record: one run per deployment check, linked to the served model's run.

Its measures (time to ready, TTFT, tokens/s), the gate's comparison and task scores (served and in
process), and metrics/serve.json, the Serve config and lineage.json as artifacts. The link to the
model's training run is a tag (`source_run_id`, from the registry lineage), as the quantize stage does.
"""

from __future__ import annotations

from pathlib import Path

from tasks.params import Params
from tasks.tracking import configure_mlflow


def run_metrics(metrics: dict) -> dict[str, float]:
    """serve.json's numbers as MLflow metrics (a gate that found a request missing has no difference)."""
    gate = metrics["gate"]
    values = {"deploy/time_to_ready_s": metrics["time_to_ready_s"], "deploy/ttft_s": metrics["ttft_s"],
              **{f"deploy/tokens_per_s/{clients}": rate for clients, rate in metrics["tokens_per_s"].items()},
              "gate/passed": float(gate["passed"]), "gate/requests": gate["requests"]}
    if gate["max_abs_diff"] is not None:
        values["gate/max_abs_diff"] = gate["max_abs_diff"]
    for side, scores in gate["scores"].items():
        values.update({f"gate/{side}/{task}": value for task, value in scores.items()})
        values[f"gate/{side}/avg"] = gate["avg"][side]
    if gate["recorded"]:
        values["gate/recorded_avg"] = gate["recorded"]["avg"]
    return {name: float(value) for name, value in values.items()}


def log_run(params: Params, metrics: dict, files: list[Path]) -> str:
    """Log the deploy run; returns its id."""
    import mlflow

    experiment_id = configure_mlflow(params)
    lineage = metrics["checks"].get("lineage", {})
    tags = {"stage": "deploy", "model_ref": metrics["model_ref"], "gate_passed": str(metrics["gate"]["passed"]).lower()}
    if lineage.get("mlflow_run_id"):
        tags["source_run_id"] = lineage["mlflow_run_id"]
        tags["mlflow.note.content"] = (f"Served and checked `{metrics['model_ref']}`, the model of run "
                                       f"`{lineage['mlflow_run_id']}`.")
    with mlflow.start_run(experiment_id=experiment_id, run_name="deploy", tags=tags) as run:
        mlflow.log_params({"model_ref": metrics["model_ref"], "gate.items": metrics["gate"]["items_per_task"],
                           "gate.tolerance": metrics["gate"]["tolerance"], "eval.tasks": ",".join(params.eval.tasks)})
        mlflow.log_metrics(run_metrics(metrics))
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="deploy")
        return run.info.run_id
