"""The driver of `tinyllama pretrain`: check inputs, place the run, start Ray Train, record results.

A run lives under `{train.checkpoint_dir}/run-<fingerprint>/` (Ray Train's storage for resume
checkpoints; outside the DVC outputs, which DVC deletes before re-running a stage). The
fingerprint covers everything that decides the training trajectory (data, model, recipe, seed)
and nothing that does not (worker count, micro-batch, logging and checkpoint cadence), so
`--resume auto` after a crash or a killed driver picks up exactly that run, possibly on a
different number of workers, and a changed recipe never resumes a stale one.
"""

from __future__ import annotations

import time

from tasks.files import sha256_json, write_json_atomic
from tasks.layout import COMPLETE_FILE, RUN_FILE, Layout, join, with_absolute_paths
from tasks.params import Params, load_params
from tasks.pretrain.loader import PreparedData, open_prepared
from tasks.train.runs import add_arguments, peak_flops_per_worker, previous_run, start_mlflow_run, tokenizer_files
from tasks.train.schedule import StepPlan

__all__ = ["add_arguments", "main", "pretrain"]


def fingerprint(params: Params, data: PreparedData) -> str:
    train = params.train
    inputs = {"seed": params.seed, "model": params.llama_config(data.vocab_size).to_dict(),
              "manifest_sha256": data.manifest_sha256, "seq_len": params.data.seq_len,
              "sources": data.weights,
              "recipe": {k: getattr(train, k) for k in ("global_batch_tokens", "total_tokens", "lr", "min_lr",
                                                         "warmup_steps", "weight_decay", "betas", "eps",
                                                         "grad_clip", "precision")}}
    return sha256_json(inputs)


def pretrain(params: Params, resume: str = "auto") -> dict:
    """Run the stage; returns what it wrote to `{paths.metrics}/pretrain.json`.

    Training happens in the run's dir (resume checkpoints and milestones, outside DVC's outputs); at the
    end every milestone is copied from there into `{paths.models}/pretrain/`. So a rerun after a crash
    (DVC deletes the stage's outputs first) resumes training and still publishes every milestone, and a
    rerun of a recipe that finished before publishes them again without training."""
    from tasks.ray_cluster import check_train_resources, console_relay, ray_session

    started = time.perf_counter()
    params = with_absolute_paths(params)  # Ray workers do not share the driver's working directory
    layout = Layout.from_params(params)
    data = open_prepared(params)  # every input check happens before anything is written
    plan = StepPlan.from_params(params)
    recipe = fingerprint(params, data)
    run_uri = layout.run_dir(f"run-{recipe[:16]}")
    previous, complete = previous_run(run_uri, resume)
    if complete is not None:
        print(f"pretrain: this recipe's run {run_uri} finished before; publishing its milestones", flush=True)
        metrics = complete
    else:
        evals = params.train.eval_milestones_during_training
        with ray_session(params, "pretrain", extra_cpus=1 if evals else 0), console_relay() as console:
            check_train_resources(params)
            metrics = _train(params, layout, data, plan, recipe, run_uri, previous, console)
        metrics["wall_time_s"] = round(time.perf_counter() - started, 2)
        write_json_atomic(join(run_uri, COMPLETE_FILE), metrics)
    published = publish_milestones(run_uri, plan, layout)
    out = write_json_atomic(layout.metrics_file("pretrain"), metrics)
    print(f"pretrain: done in {time.perf_counter() - started:.0f}s; "
          f"final train loss {metrics['final_train_loss']:.4f}, "
          f"val loss {metrics['final_val_loss']:.4f}; milestones {', '.join(published)} -> {layout.pretrain_dir}; "
          f"metrics -> {out}", flush=True)
    return metrics


def publish_milestones(run_uri: str, plan: StepPlan, layout: Layout) -> list[str]:
    """Every milestone of the plan, from the run's dir into `{paths.models}/pretrain/<name>/` (verified,
    atomically); a milestone the run did not publish whole is an error naming it."""
    from tasks.files import BrokenSeal
    from tasks.params import format_tokens
    from tasks.train.checkpoint import fetch_milestone

    names = [format_tokens(m) for m in plan.milestones]
    for name in names:
        try:
            fetch_milestone(run_uri, name, layout.milestone_dir(name))
        except BrokenSeal as exc:
            raise RuntimeError(f"milestone {name} of {run_uri} is incomplete or corrupt ({exc})") from None
    return names


def _eval_inputs(params: Params):
    """What milestone evals during training score with, gathered here: they may run on nodes that do
    not see this machine's files."""
    if not params.train.eval_milestones_during_training:
        return None
    from tasks.evaluate.scoring import collect_inputs

    return collect_inputs(params)


def _train(params: Params, layout: Layout, data: PreparedData, plan: StepPlan, recipe: str, run_uri: str,
           previous: dict | None, console) -> dict:
    """Ray Train over the run's dir, resuming from its newest valid checkpoint; returns the metrics."""
    from mlflow.entities import Metric

    from tasks.pretrain.objective import PretrainObjective
    from tasks.tracking import client as mlflow_client
    from tasks.train.launch import fit
    from tasks.train.loop import LoopConfig

    train = params.train
    peak = peak_flops_per_worker(params)
    extra = {"derived.total_steps": plan.total_steps, "derived.grad_accum": plan.grad_accum,
             "derived.tokens_per_step": plan.tokens_per_step, "derived.run_dir": run_uri,
             "derived.parameters": params.llama_config(data.vocab_size).num_params(),
             "derived.mfu_peak": ("configured plan.peak_tflops_per_worker" if peak
                                  else "measured fp32 matmul per worker")}
    uri, run_id = start_mlflow_run(params, f"pretrain-{params.profile}-{recipe[:8]}", previous, extra,
                                   tags={"stage": "pretrain"}, values=params.model_dump(mode="json"))
    write_json_atomic(join(run_uri, RUN_FILE), {"mlflow_run_id": run_id, "params": params.model_dump(mode="json")})
    print(f"pretrain: {plan.total_steps} steps × {plan.tokens_per_step} tokens ({train.workers} workers × "
          f"{train.micro_batch} rows × {plan.grad_accum} accumulation), run {run_uri}, MLflow run {run_id}",
          flush=True)
    loop_config = LoopConfig(params=params.model_dump(mode="json"),
                             objective=PretrainObjective(data, _eval_inputs(params)), run_uri=run_uri,
                             tokenizer_files=tokenizer_files(layout.tokenizer_dir), tracking_uri=uri,
                             mlflow_run_id=run_id, peak_flops_per_worker=peak, console=console)
    metrics = fit(params, loop_config)
    client = mlflow_client(uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"final/{k}", float(v), now, metrics["steps"])
                                      for k, v in metrics.items() if isinstance(v, (int, float))])
    client.set_terminated(run_id, status="FINISHED")
    return metrics


def main(args) -> int:
    from tasks.logs import stage_log

    params = load_params(args.params)
    with stage_log("pretrain", params):
        pretrain(params, resume=args.resume)
    return 0
