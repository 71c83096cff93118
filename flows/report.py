"""What a finished stage shows in the Prefect UI, and where the pipeline's results live.

Generic over stages on purpose: a stage's DVC metrics become a table, a markdown output (the
EVAL-style table) is shown as written, and any `mlflow_run_id` in its metrics becomes a link to
the MLflow UI. A new stage (sft, quantize) gets its artifact without code here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from flows.dag import Stage
from tasks.layout import LOGS_DIR
from tasks.tracking import flatten

DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
# MLflow 3's UI has a GenAI view and a model-training view (runs, metric charts, models); this query
# parameter opens the latter, which is what a pretraining pipeline's runs are.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def read_metrics(root: Path, stage: Stage) -> dict[str, dict]:
    """The stage's metrics files that exist and parse, by path."""
    found = {}
    for path in stage.metrics:
        file = root / path
        if file.is_file():
            try:
                found[path] = json.loads(file.read_text())
            except json.JSONDecodeError:
                continue
    return found


def run_ids(metrics: dict[str, dict]) -> list[str]:
    """Every `mlflow_run_id` in the metrics, at any depth (the alignment stages keep one per variant)."""
    return sorted({str(v) for m in metrics.values() if isinstance(m, dict)
                   for k, v in flatten(m).items() if k.rsplit(".", 1)[-1] == "mlflow_run_id" and v})


def mlflow_ui_url() -> str:
    return os.environ.get("MLFLOW_UI_URL", DEFAULT_MLFLOW_UI).rstrip("/")


def run_link(run_id: str, experiment_id: str | None) -> str:
    if experiment_id is None:
        return f"{mlflow_ui_url()}/#/runs/{run_id}?{MODEL_TRAINING_VIEW}"
    return f"{mlflow_ui_url()}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def stage_markdown(root: Path, stage: Stage, ran: bool, links: dict[str, str]) -> str:
    """The stage's artifact: status, metrics table, markdown outputs, MLflow links."""
    lines = [f"# {stage.name}", "", "ran" if ran else "up to date (DVC cache): nothing to rerun", ""]
    for path, metrics in read_metrics(root, stage).items():
        lines += [f"## {path}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in flatten(metrics).items()]
        lines.append("")
    for path in stage.outs:
        file = root / path
        if file.suffix == ".md" and file.is_file():
            lines += [f"## {path}", "", file.read_text().strip(), ""]
    if links:
        lines += ["## MLflow", ""] + [f"- [run {run_id}]({url})" for run_id, url in links.items()] + [""]
    outs = [f"- `{path}`" + ("" if (root / path).exists() else " (missing)") for path in stage.outs]
    return "\n".join(lines + ["## Outputs", ""] + outs) + "\n"


def artifact_key(stage: Stage) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", stage.name.lower()).strip("-") + "-stage"


def summary(root: Path, stages: list[Stage], results: list, tracking_uri: str) -> str:
    """What ran and where everything is, printed when the pipeline ends."""
    ran = {r.name: r for r in results}
    timing = ", ".join(f"{name} {r.seconds:.0f} s" if r.ran else f"{name} cached" for name, r in ran.items())
    lines = ["", f"Pipeline finished: {timing}.", "Where everything is:", ""]
    if tracking_uri.startswith("sqlite:"):
        artifacts = root / "mlflow" / "artifacts"
        lines += [f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} "
                  f"--default-artifact-root {artifacts} --port 5000",
                  f"              then open {DEFAULT_MLFLOW_UI}/#/experiments?{MODEL_TRAINING_VIEW}",
                  "              or `make services` (Prefect + MLflow servers in the background)"]
    else:
        lines.append(f"  MLflow:     {tracking_uri}")
    lines += ["  Metrics:    .venv/bin/dvc metrics show",
              f"  Logs:       {root / LOGS_DIR}/<stage>.log (everything each stage printed and logged; Ray workers' "
              f"output in <stage>-ray/)",
              f"  Outputs:    under {root}/"]
    for stage in stages:  # one line per stage: the console stays short (tests/test_logs.py)
        outs = [path + ("" if (root / path).exists() else " (missing)") for path in stage.outs]
        lines.append(f"    {stage.name:<10} {', '.join(outs)}")
    return "\n".join(lines) + "\n"
