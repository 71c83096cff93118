"""The driver of `tinyllama sft` and `tinyllama dpo`: every variant's data checked, trained on the
pretraining path, evaluated, logged and registered.

Order matters for the user: first every input of every variant is read and checked (sources, bad
fractions, the base milestone or SFT model, the length policy), so bad input fails with exit 2
before any training; then each job trains through `tasks.pretrain.run.fit` (Ray Train, the one
loop, resume checkpoints under `{sft.checkpoint_dir}/<kind>-<variant>-<fingerprint>/`, retries; a
job whose run finished before is not trained again, its model is fetched from the run's dir);
then each model is scored (lm-eval suite + chat accuracy), logged into its variant's MLflow run and
registered as a version of `sft.registered_model`.

MLflow: one run per variant (`chat-<variant>`, nested under the pretrain run) holds the SFT
recipe, the SFT training curves (`sft/loss`, ...) and every evaluation (`base/…`, `sft/…`,
`dpo/…`); the DPO training (recipe, curves, TRL's `rewards/*`) is a run nested under it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model.chat import template
from tasks.errors import UserError
from tasks.files import read_json, sha256_file, write_atomic, write_json_atomic
from tasks.layout import CONFIG_FILE, WEIGHTS_FILE, Layout, with_absolute_paths
from tasks.params import Params, VariantParams

if TYPE_CHECKING:  # the data code imports torch: only once the stage's log is set up (tasks/logs.py)
    from tasks.sft.datasets import TrainingSet

KINDS = ("sft", "dpo")


@dataclass
class Job:
    kind: str
    variant: VariantParams
    start_dir: Path
    out_dir: Path
    data: TrainingSet
    data_bytes: bytes
    fingerprint: str

    @property
    def recipe(self):
        return self.variant.dpo if self.kind == "dpo" else self.variant

    def recipe_values(self) -> dict:
        """The job's own knobs (an SFT job's exclude its variant's DPO section and data sources)."""
        return self.recipe.model_dump(mode="json", exclude={"sources", "dpo"})

    @property
    def run_name(self) -> str:
        return f"{self.kind}-{self.variant.name}-{self.fingerprint[:16]}"


def _start_dir(layout: Layout, variant: VariantParams, kind: str) -> Path:
    from tasks.sft.datasets import where

    if kind == "sft":
        directory = layout.milestone_dir(variant.base)
        if not (directory / WEIGHTS_FILE).is_file():
            found = sorted(p.name for p in layout.pretrain_dir.glob("*") if (p / WEIGHTS_FILE).is_file())
            raise UserError(f"{where(variant)}.base: no milestone checkpoint at {directory} (milestones found: "
                            f"{', '.join(found) or 'none'}; run `tinyllama pretrain` first)")
    else:
        directory = layout.sft_dir(variant.name)
        if not (directory / WEIGHTS_FILE).is_file():
            raise UserError(f"{where(variant, True)}: no SFT model at {directory} (run `tinyllama sft` first)")
    return directory


def _fingerprint(params: Params, job: Job) -> str:
    inputs = {"kind": job.kind, "seed": params.seed, "recipe": job.recipe_values(),
              "template": job.variant.template, "max_length": job.variant.max_length, "packing": job.variant.packing,
              "data_sha256": hashlib.sha256(job.data_bytes).hexdigest(),
              "start_sha256": sha256_file(job.start_dir / WEIGHTS_FILE),
              "train": {k: getattr(params.train, k) for k in ("precision", "grad_clip", "betas", "eps")}}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=list).encode()).hexdigest()


def plan_jobs(params: Params, layout: Layout, kind: str) -> list[Job]:
    """Every job of the stage with its data built and checked; nothing written."""
    from model.tokenizer import Tokenizer
    from tasks.sft.datasets import build
    from tasks.sft.loader import encode_arrays

    if params.sft is None:
        raise UserError("sft: the profile has no sft section (variants to align)")
    variants = [v for v in params.sft.variants if kind == "sft" or v.dpo is not None]
    jobs = []
    for variant in variants:
        start = _start_dir(layout, variant, kind)
        data = build(params, variant, Tokenizer.load(start), dpo=kind == "dpo")
        out = layout.dpo_dir(variant.name) if kind == "dpo" else layout.sft_dir(variant.name)
        job = Job(kind, variant, start, out, data, encode_arrays(data.arrays), "")
        job.fingerprint = _fingerprint(params, job)
        jobs.append(job)
    return jobs


def _mlflow_run(params: Params, job: Job, previous: dict | None, parent_run: str) -> tuple[str, str]:
    from tasks.pretrain.run import start_mlflow_run

    variant = job.variant
    if job.kind == "sft":
        tags = {"stage": "sft", "variant": variant.name, "base_milestone": variant.base}
        tags |= {"mlflow.parentRunId": parent_run, "pretrain_run_id": parent_run} if parent_run else {}
        values = {"variant": variant.model_dump(mode="json", exclude={"dpo"})}
        name = f"chat-{variant.name}"
    else:
        tags = {"stage": "dpo", "variant": variant.name} | ({"mlflow.parentRunId": parent_run} if parent_run else {})
        values = {"dpo": variant.dpo.model_dump(mode="json")}
        name = f"dpo-{variant.name}"
    extra = {f"data.{k}": v for k, v in job.data.summary.items() if not isinstance(v, dict)}
    return start_mlflow_run(params, name, previous, extra, tags=tags, values=values)


def train_job(params: Params, layout: Layout, job: Job, parent_run: str | None, resume: str, console=None) -> dict:
    """Train one job on Ray Train and fetch its model into `job.out_dir`; returns its metrics (those of
    pretrain.json) and MLflow run id. Its MLflow run is nested under `parent_run` (SFT: the pretrain
    run; DPO: the variant's run)."""
    from tasks.layout import join
    from tasks.pretrain.checkpoint import fetch_milestone
    from tasks.pretrain.run import COMPLETE_FILE, previous_run
    from tasks.sft.objectives import MODEL_MILESTONE

    started = time.perf_counter()
    run_uri = layout.alignment_run_dir(job.run_name)
    previous, complete = previous_run(run_uri, resume)
    if complete is None:
        complete = _train(params, job, run_uri, previous, parent_run, console)
        complete["wall_time_s"] = round(time.perf_counter() - started, 2)
        write_json_atomic(join(run_uri, COMPLETE_FILE), complete)
    else:
        print(f"{job.kind} {job.variant.name}: this recipe's run {run_uri} finished before; fetching its model",
              flush=True)
    fetch_milestone(run_uri, MODEL_MILESTONE, job.out_dir)
    return complete


def _train(params: Params, job: Job, run_uri: str, previous: dict | None, parent_run: str | None, console) -> dict:
    """The job's MLflow run, data and starting weights into the run's dir, then Ray Train."""
    from tasks.layout import join
    from tasks.pretrain.checkpoint import milestone_uri, publish_milestone
    from tasks.pretrain.loop import LoopConfig
    from tasks.pretrain.run import RUN_FILE, fit, peak_flops_per_worker, tokenizer_files
    from tasks.sft.loader import DATA_FILE
    from tasks.sft.objectives import START_MILESTONE, AlignmentJob, DpoObjective, SftObjective
    from tasks.tracking import client as mlflow_client

    uri, run_id = _mlflow_run(params, job, previous, parent_run)
    write_json_atomic(join(run_uri, RUN_FILE), {"mlflow_run_id": run_id})
    data_uri = join(run_uri, DATA_FILE)
    write_atomic(data_uri, job.data_bytes)
    publish_milestone(job.start_dir, run_uri, START_MILESTONE, {"source": str(job.start_dir)})
    chat = template(job.variant.template)
    metadata = {"variant": job.variant.name, "stage": job.kind, "base_milestone": job.variant.base,
                "template": chat.name, "tokens_seen": read_json(job.start_dir / CONFIG_FILE)
                .get("tinyllama", {}).get("tokens_seen", 0)}
    spec = AlignmentJob(kind=job.kind, variant=job.variant.name, start_uri=milestone_uri(run_uri, START_MILESTONE),
                        data_uri=data_uri, data_sha256=hashlib.sha256(job.data_bytes).hexdigest(),
                        items=job.data.items, row_length=job.variant.max_length, packed=job.kind == "sft" and
                        job.variant.packing, recipe=job.recipe_values(), template=chat.source, stop_strings=chat.stop,
                        metadata=metadata)
    objective = (DpoObjective if job.kind == "dpo" else SftObjective)(spec)
    plan = objective.plan(params)
    print(f"{job.kind} {job.variant.name}: {plan.total_steps} steps × {job.recipe.batch_size} "
          f"{'pairs' if job.kind == 'dpo' else 'rows'} ({job.data.items} in the set, {job.recipe.epochs:g} epochs) "
          f"from {job.start_dir}, run {run_uri}, MLflow run {run_id}", flush=True)
    config = LoopConfig(params=params.model_dump(mode="json"), objective=objective, run_uri=run_uri,
                        tokenizer_files=tokenizer_files(job.start_dir), tracking_uri=uri, mlflow_run_id=run_id,
                        peak_flops_per_worker=peak_flops_per_worker(params), console=console)
    metrics = fit(params, config)
    if job.kind == "dpo":  # an SFT run stays open: its variant's evaluations are logged into it
        mlflow_client(uri).set_terminated(run_id, status="FINISHED")
    return metrics


def dvc_stage_hash() -> str:
    """A hash of what DVC knows about the running stage (its command, the hashes of its deps and its
    params), taken through DVC's API when the stage runs under `dvc repro`; 'none' otherwise."""
    import os

    stage_name, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not stage_name or not root:
        return "none"
    from dvc.repo import Repo

    with Repo(root) as repo:
        stage = repo.stage.collect(f"{root}/dvc.yaml:{stage_name}")[0]
        stage.save_deps()  # content hashes of code and data deps, values of params deps, as dvc.lock records them
        deps = sorted((str(dep.def_path), json.dumps(dep.hash_info.value, sort_keys=True, default=str))
                      for dep in stage.deps)
    return hashlib.sha256(json.dumps({"cmd": stage.cmd, "deps": deps}).encode()).hexdigest()


def evaluate_and_register(params: Params, layout: Layout, jobs: list[Job], trained: dict[str, dict],
                          variant_runs: dict[str, str], prior: dict) -> tuple[dict, list[str], str]:
    """Score the base milestone (SFT stage) and every trained model, log them into the variant's run and
    register them. Returns (metrics by variant, task names, eval settings note)."""
    from mlflow import MlflowClient

    from tasks.evaluate.stage import settings_note
    from tasks.evaluate.scoring import collect_inputs
    from tasks.registry import register_chat_model
    from tasks.sft.chat_accuracy import eval_items
    from tasks.sft.scorecard import evaluate_model, log_evaluation
    from tasks.sft.report import model_metrics
    from tasks.tracking import tracking_uri

    uri = tracking_uri(params)
    client = MlflowClient(uri)
    items = eval_items(params)
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


def run_stage(params: Params, kind: str, resume: str = "auto") -> dict:
    """`tinyllama sft|dpo`: check, train, evaluate, register, report. Returns the stage's metrics."""
    from tasks.evaluate.stage import pretrain_run_id
    from tasks.ray_cluster import check_train_resources, console_relay, ray_session
    from tasks.sft.report import chat_table

    params = with_absolute_paths(params)
    layout = Layout.from_params(params)
    jobs = plan_jobs(params, layout, kind)  # every input check, before anything is written
    prior = read_json(layout.metrics_file("sft"), "run `tinyllama sft` first") if kind == "dpo" else {}
    missing = [job.variant.name for job in jobs if kind == "dpo" and "mlflow_run_id" not in prior.get(job.variant.name, {})]
    if missing:
        raise UserError(f"sft.variants[{missing[0]}].dpo: {layout.metrics_file('sft')} has no SFT result for it "
                        "(run `tinyllama sft` first)")
    if kind == "sft":
        parent = pretrain_run_id(params)
    trained, runs = {}, {}
    with ray_session(params, kind), console_relay() as console:
        if jobs:
            check_train_resources(params, milestone_evals=False)
        for job in jobs:
            if kind == "dpo":
                parent = prior[job.variant.name]["mlflow_run_id"]
            trained[job.variant.name] = train_job(params, layout, job, parent, resume, console)
            runs[job.variant.name] = trained[job.variant.name]["mlflow_run_id"] if kind == "sft" else parent
    metrics, tasks, settings = evaluate_and_register(params, layout, jobs, trained, runs, prior)
    write_json_atomic(layout.metrics_file(kind), {name: {k: v for k, v in entry.items() if k == kind or
                                                         k in ("base", "base_milestone", "template", "mlflow_run_id")}
                                                  for name, entry in metrics.items()})
    table_entries = {**prior, **metrics} if kind == "dpo" else metrics
    table = layout.report_file("chat_table.md" if kind == "dpo" else "sft_table.md")
    write_atomic(table, chat_table(table_entries, tasks, settings).encode())
    print(f"{kind}: wrote {layout.metrics_file(kind)} and {table}", flush=True)
    return metrics


def stage_main(kind: str):
    """`main(args)` of `tinyllama sft|dpo`: the stage under its log (`logs/<kind>.log`)."""
    def main(args) -> int:
        from tasks.logs import stage_log
        from tasks.params import load_params

        params = load_params(args.params)
        with stage_log(kind, params):
            run_stage(params, kind, resume=args.resume)
        return 0

    return main
