"""Eval results into the *pretrain* MLflow run, with `step = tokens seen`.

Why the pretrain run and a token step: the UI then charts every task's score against tokens next to
the loss curve, which is the scaling trajectory TinyLlama's EVAL.md shows as a table. Writes go
through `MlflowClient` with an explicit run id: the run may be active in the training process, or
already finished when the `evaluate` stage fills the gaps.
"""

from __future__ import annotations

import time
from pathlib import Path

FAILED_TAG = "eval_failed/{milestone}"
WEIGHTS_TAG = "eval_sha256/{milestone}"  # which checkpoint the logged scores belong to


def client_for(tracking_uri: str):
    from tasks.tracking import client

    return client(tracking_uri)


def result_metrics(result: dict) -> dict[str, float]:
    metrics = {f"eval/{task}/{score['metric']}": score["value"] for task, score in result["scores"].items()}
    metrics["eval/avg"] = result["avg"]
    metrics["eval/val_ppl"] = result["val_ppl"]
    metrics["eval/wall_s"] = result["wall_s"]
    return metrics


def log_result(client, run_id: str, result: dict) -> None:
    """One batch per milestone: a single write, so a concurrent training logger rarely contends."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(result["tokens"])) for key, value in result_metrics(result).items()]
    client.log_batch(run_id, metrics=metrics, tags=[RunTag(WEIGHTS_TAG.format(milestone=result["milestone"]),
                                                           result["weights_sha256"])])
    failed = FAILED_TAG.format(milestone=result["milestone"])
    if failed in client.get_run(run_id).data.tags:  # a re-score that succeeded clears the old failure
        client.delete_tag(run_id, failed)


def is_logged(client, run_id: str, result: dict) -> bool:
    """Whether this milestone's scores for these very weights are already in the run."""
    tags = client.get_run(run_id).data.tags
    return tags.get(WEIGHTS_TAG.format(milestone=result["milestone"])) == result["weights_sha256"]


def mark_failed(client, run_id: str, milestone: str, error: str) -> None:
    """Visible in the run's tags (and searchable: `tags."eval_failed/100K" != ''`)."""
    client.set_tag(run_id, FAILED_TAG.format(milestone=milestone), error[:5000] or "failed")


def log_report_files(client, run_id: str, files: list[Path]) -> None:
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="eval")
