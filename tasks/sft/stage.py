"""`tinyllama sft` and `tinyllama dpo`: every variant's data checked, trained through the training
library, evaluated, logged and registered.

Order matters for the user: first every input of every variant is read and checked (jobs.py), so bad
input fails with exit 2 before any training; then each job trains (training.py: Ray Train, the one
loop, resume checkpoints, retries); then each model is scored, logged and registered (register.py);
last the stage's metrics (`{paths.metrics}/<kind>.json`) and table are written.

  sft   each `sft.variants` entry from its base milestone -> `{paths.models}/sft/<variant>/`, sft.json,
        sft_table.md
  dpo   each variant with a `dpo` section from its SFT model (also the frozen reference) ->
        `{paths.models}/dpo/<variant>/`, dpo.json, chat_table.md (base vs SFT vs SFT+DPO)
"""

from __future__ import annotations

from tasks.errors import UserError
from tasks.files import read_json, write_atomic, write_json_atomic
from tasks.layout import Layout, with_absolute_paths
from tasks.params import Params, load_params
from tasks.train.runs import add_arguments

__all__ = ["add_arguments", "main", "run_stage"]


def run_stage(params: Params, kind: str, resume: str = "auto") -> dict:
    """`tinyllama sft|dpo`: check, train, evaluate, register, report. Returns the stage's metrics."""
    from tasks.evaluate.stage import pretrain_run_id
    from tasks.ray_cluster import check_train_resources, console_relay, ray_session
    from tasks.sft.chat_accuracy import eval_items
    from tasks.sft.jobs import plan_jobs
    from tasks.sft.register import evaluate_and_register
    from tasks.sft.report import chat_table
    from tasks.sft.training import train_job

    params = with_absolute_paths(params)
    layout = Layout.from_params(params)
    jobs = plan_jobs(params, layout, kind)  # every input check, before anything is written
    items = eval_items(params)  # the chat eval's questions too (sft.chat_eval.source), not after training
    prior = read_json(layout.metrics_file("sft"), "run `tinyllama sft` first") if kind == "dpo" else {}
    missing = [job.variant.name for job in jobs
               if kind == "dpo" and "mlflow_run_id" not in prior.get(job.variant.name, {})]
    if missing:
        raise UserError(f"sft.variants[{missing[0]}].dpo: {layout.metrics_file('sft')} has no SFT result for it "
                        "(run `tinyllama sft` first)")
    pretrain_run = pretrain_run_id(params) if kind == "sft" else None
    trained, runs = {}, {}
    with ray_session(params, kind), console_relay() as console:
        if jobs:
            check_train_resources(params, milestone_evals=False)
        for job in jobs:  # SFT nests under the pretrain run, DPO under its variant's run
            parent = pretrain_run if kind == "sft" else prior[job.variant.name]["mlflow_run_id"]
            trained[job.variant.name] = train_job(params, layout, job, parent, resume, console)
            runs[job.variant.name] = trained[job.variant.name]["mlflow_run_id"] if kind == "sft" else parent
    metrics, tasks, settings = evaluate_and_register(params, layout, jobs, trained, runs, prior, items)
    write_json_atomic(layout.metrics_file(kind), {name: {k: v for k, v in entry.items() if k == kind or
                                                         k in ("base", "base_milestone", "template", "mlflow_run_id")}
                                                  for name, entry in metrics.items()})
    table_entries = {**prior, **metrics} if kind == "dpo" else metrics
    table = layout.report_file("chat_table.md" if kind == "dpo" else "sft_table.md")
    write_atomic(table, chat_table(table_entries, tasks, settings).encode())
    print(f"{kind}: wrote {layout.metrics_file(kind)} and {table}", flush=True)
    return metrics


def main(args) -> int:
    """The stage the subcommand names (`sft` or `dpo`), under its log (`logs/<kind>.log`)."""
    from tasks.logs import stage_log

    kind = args.command
    params = load_params(args.params)
    with stage_log(kind, params):
        run_stage(params, kind, resume=args.resume)
    return 0
