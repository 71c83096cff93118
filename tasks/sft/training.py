"""One SFT or DPO job trained through the training library (`tasks.train.launch.fit`).

Its run's dir is `{sft.checkpoint_dir}/<kind>-<variant>-<fingerprint>/`: Ray Train's resume
checkpoints, the tokenized set and the sealed starting weights the workers read, and the sealed
result they publish. A job whose run finished before is not trained again: its model is fetched
from the run's dir. MLflow: an SFT job's run (`chat-<variant>`, nested under the pretrain run)
stays open for its variant's evaluations; a DPO job's run (`dpo-<variant>`) nests under it.
"""

from __future__ import annotations

import time

from model.chat import template
from tasks.files import read_json, write_atomic, write_json_atomic
from tasks.layout import COMPLETE_FILE, CONFIG_FILE, RUN_FILE, Layout, join
from tasks.params import Params
from tasks.sft.jobs import Job
from tasks.train.runs import peak_flops_per_worker, previous_run, start_mlflow_run, tokenizer_files


def _mlflow_run(params: Params, job: Job, previous: dict | None, parent_run: str | None) -> tuple[str, str]:
    variant = job.variant
    parent = {"mlflow.parentRunId": parent_run} if parent_run else {}
    if job.kind == "sft":
        tags = {"stage": "sft", "variant": variant.name, "base_milestone": variant.base,
                **parent, **({"pretrain_run_id": parent_run} if parent_run else {})}
        values = {"variant": variant.model_dump(mode="json", exclude={"dpo"})}
        name = f"chat-{variant.name}"
    else:
        tags = {"stage": "dpo", "variant": variant.name, **parent}
        values = {"dpo": variant.dpo.model_dump(mode="json")}
        name = f"dpo-{variant.name}"
    extra = {f"data.{k}": v for k, v in job.data.summary.items() if not isinstance(v, dict)}
    return start_mlflow_run(params, name, previous, extra, tags=tags, values=values)


def train_job(params: Params, layout: Layout, job: Job, parent_run: str | None, resume: str, console=None) -> dict:
    """Train one job on Ray Train and fetch its model into `job.out_dir`; returns its metrics (those of
    pretrain.json) and MLflow run id. Its MLflow run is nested under `parent_run` (SFT: the pretrain
    run; DPO: the variant's run)."""
    from tasks.sft.objectives import MODEL_MILESTONE
    from tasks.train.checkpoint import fetch_milestone

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
    from tasks.sft.loader import DATA_FILE
    from tasks.sft.objectives import START_MILESTONE, AlignmentJob, DpoObjective, SftObjective
    from tasks.tracking import client as mlflow_client
    from tasks.train.checkpoint import milestone_uri, publish_milestone
    from tasks.train.launch import fit
    from tasks.train.loop import LoopConfig

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
                        data_uri=data_uri, data_sha256=job.data_sha256, items=job.data.items,
                        row_length=job.variant.max_length, packed=job.kind == "sft" and job.variant.packing,
                        recipe=job.recipe, template=chat.source, stop_strings=chat.stop, metadata=metadata)
    objective = (DpoObjective if job.kind == "dpo" else SftObjective)(spec)
    plan = objective.plan(params)
    print(f"{job.kind} {job.variant.name}: {plan.total_steps} steps × {spec.recipe.batch_size} "
          f"{'pairs' if job.kind == 'dpo' else 'rows'} ({job.data.items} in the set, {spec.recipe.epochs:g} epochs) "
          f"from {job.start_dir}, run {run_uri}, MLflow run {run_id}", flush=True)
    config = LoopConfig(params=params.model_dump(mode="json"), objective=objective, run_uri=run_uri,
                        tokenizer_files=tokenizer_files(job.start_dir), tracking_uri=uri, mlflow_run_id=run_id,
                        peak_flops_per_worker=peak_flops_per_worker(params), console=console)
    metrics = fit(params, config)
    if job.kind == "dpo":  # an SFT run stays open: its variant's evaluations are logged into it
        mlflow_client(uri).set_terminated(run_id, status="FINISHED")
    return metrics
