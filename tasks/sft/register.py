"""Each trained chat model scored, logged into its variant's MLflow run and registered.

The SFT stage scores the base milestone too, so a variant's row compares with where it started; every
model gets the lm-eval suite and the held-out chat accuracy (tasks/sft/scorecard.py), is logged into
its variant's run (`base/…`, `sft/…`, `dpo/…`) and becomes a version of `sft.registered_model`
tagged with its lineage (variant, tokens, the stage's DVC hash).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from model.chat import template
from tasks.layout import Layout
from tasks.params import Params
from tasks.sft.jobs import Job


def evaluate_and_register(params: Params, layout: Layout, jobs: list[Job], trained: dict[str, dict],
                          variant_runs: dict[str, str], prior: dict, items: list) -> tuple[dict, list[str], str]:
    """Score the base milestone (SFT stage) and every trained model on the MC tasks and the chat eval's
    `items` (read by the stage before training), log them into the variant's run and register them.
    Returns (metrics by variant, task names, eval settings note)."""
    from mlflow import MlflowClient

    from tasks.dvc_stage import dvc_stage_hash
    from tasks.evaluate.scoring import collect_inputs
    from tasks.evaluate.stage import settings_note
    from tasks.registry import register_chat_model
    from tasks.sft.report import model_metrics
    from tasks.sft.scorecard import evaluate_model, log_evaluation
    from tasks.tracking import tracking_uri

    uri = tracking_uri(params)
    client = MlflowClient(uri)
    stage_hash = dvc_stage_hash()
    metrics = {}
    with tempfile.TemporaryDirectory(prefix="tinyllama-eval-") as include_dir:
        inputs = collect_inputs(params)
        taskset = inputs.tasks.write(Path(include_dir))
        for job in jobs:
            variant, chat, training = job.variant, template(job.variant.template), trained[job.variant.name]
            run_id = variant_runs[variant.name]
            entry = dict(prior.get(variant.name, {}), base_milestone=variant.base, template=chat.name,
                         mlflow_run_id=run_id)
            if job.kind == "sft":
                base = evaluate_model(params, inputs, taskset, layout.milestone_dir(variant.base), variant.base,
                                      chat.source, items)
                log_evaluation(client, run_id, "base", base, 0)
                entry["base"] = model_metrics(base, taskset.names)
            result = evaluate_model(params, inputs, taskset, job.out_dir, f"{variant.name}/{job.kind}", chat.source,
                                    items)
            log_evaluation(client, run_id, job.kind, result, 0)
            aligned = training["tokens"] + entry.get("sft", {}).get("tokens_trained", 0) * (job.kind == "dpo")
            tags = {"variant": variant.name, "stage": job.kind, "base_milestone": variant.base, "template": chat.name,
                    "tokens": str(result["tokens"] + aligned), "pretrain_tokens": str(result["tokens"]),
                    "alignment_tokens": str(aligned), "dvc_stage_hash": stage_hash}
            registered = register_chat_model(uri, params.sft.registered_model, training["mlflow_run_id"], job.out_dir,
                                             f"{job.kind}/model", tags, result["chat_accuracy"])
            entry[job.kind] = model_metrics(result, taskset.names, {
                "tokens_trained": training["tokens"], "steps": training["steps"],
                "final_train_loss": training["final_train_loss"], "final_val_loss": training["final_val_loss"],
                "tokens_per_s": training["tokens_per_s"], "wall_time_s": training["wall_time_s"],
                "registered_version": int(registered.version), "data": _numbers(job.data.summary)})
            metrics[variant.name] = entry
            client.set_terminated(run_id, status="FINISHED")
            before = entry["sft" if job.kind == "dpo" else "base"]["chat_accuracy"]
            print(f"{job.kind} {variant.name}: chat accuracy {result['chat_accuracy']:.3f} (was {before:.3f}), "
                  f"lm-eval avg {result['avg']:.4f}; registered {params.sft.registered_model} v{registered.version}"
                  f"{' (champion)' if registered.champion else ''}", flush=True)
        return metrics, taskset.names, settings_note(params, taskset)


def _numbers(summary: dict) -> dict:
    """The data summary without its strings (input hashes): DVC metrics are numbers."""
    out = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            value = _numbers({k: v for k, v in value.items() if k != "inputs"})
        if isinstance(value, (int, float, dict)):
            out[key] = value
    return out
