"""The driver of `tinyllama pretrain`: check inputs, place the run, start Ray Train, record results.

A run lives under `{train.checkpoint_dir}/run-<fingerprint>/` (Ray Train's storage for resume
checkpoints; outside the DVC outputs, which DVC deletes before re-running a stage). The
fingerprint covers everything that decides the training trajectory (data, model, recipe, seed)
and nothing that does not (worker count, micro-batch, logging and checkpoint cadence), so
`--resume auto` after a crash or a killed driver picks up exactly that run, possibly on a
different number of workers, and a changed recipe never resumes a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from tasks.files import exists, read_json, remove_tree, write_json_atomic
from tasks.layout import TOKENIZER_FILES, Layout, join, with_absolute_paths
from tasks.params import Params, add_params_argument, load_params
from tasks.pretrain.loader import PreparedData, open_prepared
from tasks.pretrain.schedule import StepPlan

log = logging.getLogger("tinyllama.pretrain")

RUN_FILE = "run.json"
COMPLETE_FILE = "complete.json"
METRIC_KEYS = ("final_train_loss", "final_val_loss", "tokens", "steps", "tokens_per_s")


def fingerprint(params: Params, data: PreparedData) -> str:
    train = params.train
    inputs = {"seed": params.seed, "model": params.llama_config(data.vocab_size).to_dict(),
              "manifest_sha256": data.manifest_sha256, "seq_len": params.data.seq_len,
              "sources": data.weights,
              "recipe": {k: getattr(train, k) for k in ("global_batch_tokens", "total_tokens", "lr", "min_lr",
                                                         "warmup_steps", "weight_decay", "betas", "eps",
                                                         "grad_clip", "precision")}}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=list).encode()).hexdigest()


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: `train.lr` → "0.003"."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


def previous_run(run_uri: str, resume: str) -> tuple[dict | None, dict | None]:
    """(run.json, complete.json) of this recipe's earlier run when continuing it, (None, None) after
    clearing its dir when starting over (`--resume never`)."""
    if resume == "never":
        if exists(run_uri):
            log.warning("starting over in %s (--resume never)", run_uri)
        remove_tree(run_uri)
        return None, None
    record = read_json(join(run_uri, RUN_FILE)) if exists(join(run_uri, RUN_FILE)) else None
    complete = read_json(join(run_uri, COMPLETE_FILE)) if record and exists(join(run_uri, COMPLETE_FILE)) else None
    return record, complete


def start_mlflow_run(params: Params, run_name: str, previous: dict | None, extra: dict, tags: dict | None = None,
                     values: dict | None = None) -> tuple[str, str]:
    """The run a training job logs to: resumed when the previous attempt's run still exists, else a new
    one named `run_name` with `tags` (default: the pretrain stage's), whose params are `values` (default:
    every param of the profile) flattened, plus `extra`. Returns (tracking uri, run id)."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from tasks.tracking import client as mlflow_client
    from tasks.tracking import configure_mlflow, tracking_uri

    experiment_id = configure_mlflow(params)
    uri = tracking_uri(params)
    client = mlflow_client(uri)
    if previous is not None:
        try:
            client.get_run(previous["mlflow_run_id"])
            client.update_run(previous["mlflow_run_id"], status="RUNNING")
            return uri, previous["mlflow_run_id"]
        except MlflowException:
            log.warning("MLflow run %s of the resumed run is gone; logging to a new run", previous["mlflow_run_id"])
    run = client.create_run(experiment_id, run_name=run_name, tags=tags or {"stage": "pretrain"})
    values = params.model_dump(mode="json") if values is None else values
    flat = {**flatten(values), **{k: str(v) for k, v in extra.items()}}
    entries = [Param(k, v) for k, v in sorted(flat.items())]
    for start in range(0, len(entries), 100):  # MLflow's per-request param limit
        client.log_batch(run.info.run_id, params=entries[start:start + 100])
    return uri, run.info.run_id


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
    print(f"pretrain: done in {time.perf_counter() - started:.0f}s; final train loss {metrics['final_train_loss']:.4f}, "
          f"val loss {metrics['final_val_loss']:.4f}; milestones {', '.join(published)} -> {layout.pretrain_dir}; "
          f"metrics -> {out}", flush=True)
    return metrics


def publish_milestones(run_uri: str, plan: StepPlan, layout: Layout) -> list[str]:
    """Every milestone of the plan, from the run's dir into `{paths.models}/pretrain/<name>/` (verified,
    atomically); a milestone the run did not publish whole is an error naming it."""
    from tasks.files import BrokenSeal
    from tasks.params import format_tokens
    from tasks.pretrain.checkpoint import fetch_milestone

    names = [format_tokens(m) for m in plan.milestones]
    for name in names:
        try:
            fetch_milestone(run_uri, name, layout.milestone_dir(name))
        except BrokenSeal as exc:
            raise RuntimeError(f"milestone {name} of {run_uri} is incomplete or corrupt ({exc})") from None
    return names


def last_checkpoint_metrics(run_uri: str) -> dict:
    """The metrics sealed into the run's newest checkpoint (the loop checkpoints its final step)."""
    from tasks.pretrain.checkpoint import CHECKPOINT_JSON, list_checkpoints

    newest = list_checkpoints(run_uri)[0]
    return read_json(join(run_uri, newest, CHECKPOINT_JSON))["metrics"]


def _eval_inputs(params: Params):
    """What milestone evals during training score with, gathered here: they may run on nodes that do
    not see this machine's files."""
    if not params.train.eval_milestones_during_training:
        return None
    from tasks.evaluate.scoring import collect_inputs

    return collect_inputs(params)


def tokenizer_files(directory: Path) -> dict[str, bytes]:
    """The tokenizer files of a dir, shipped to the workers in memory (they may not see this disk)."""
    return {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}


def peak_flops_per_worker(params: Params) -> float | None:
    """The MFU denominator: configured for GPUs, None on CPU (each worker measures its matmul peak)."""
    return params.plan.peak_tflops_per_worker * 1e12 if params.train.use_gpu else None


def fit(params: Params, loop_config) -> dict:
    """Train `loop_config.objective` with the one loop on Ray Train (TorchTrainer) in the run's dir
    `loop_config.run_uri`: `train.workers` workers, failures retried from the newest valid checkpoint.
    Every objective (pretraining, SFT, DPO) runs through here. Returns the MLflow run id and the metrics
    sealed into the final checkpoint; when training failed for good (after `train.max_failures`
    restarts) it marks the MLflow run FAILED and raises."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasks.pretrain.loop import train_loop
    from tasks.ray_cluster import training_bundles
    from tasks.tracking import client as mlflow_client

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every progress line prints twice
    train = params.train
    storage, name = loop_config.run_uri.rstrip("/").rsplit("/", 1)
    # One definition of a worker's resources: what check_train_resources reserved, `trainer` included.
    resources = training_bundles(params, milestone_evals=False)[0]
    trainer = TorchTrainer(
        lambda config: train_loop(config["loop"]), train_loop_config={"loop": loop_config},
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=train.max_failures)))
    try:
        trainer.fit()
        reported = last_checkpoint_metrics(loop_config.run_uri)
    except BaseException:
        mlflow_client(loop_config.tracking_uri).set_terminated(loop_config.mlflow_run_id, status="FAILED")
        raise
    return {"mlflow_run_id": loop_config.mlflow_run_id, **{k: reported.get(k) for k in METRIC_KEYS}}


def _train(params: Params, layout: Layout, data: PreparedData, plan: StepPlan, recipe: str, run_uri: str,
           previous: dict | None, console) -> dict:
    """Ray Train over the run's dir, resuming from its newest valid checkpoint; returns the metrics."""
    from mlflow.entities import Metric

    from tasks.pretrain.loop import LoopConfig
    from tasks.pretrain.objective import PretrainObjective
    from tasks.tracking import client as mlflow_client

    train = params.train
    peak = peak_flops_per_worker(params)
    extra = {"derived.total_steps": plan.total_steps, "derived.grad_accum": plan.grad_accum,
             "derived.tokens_per_step": plan.tokens_per_step, "derived.run_dir": run_uri,
             "derived.parameters": params.llama_config(data.vocab_size).num_params(),
             "derived.mfu_peak": "configured plan.peak_tflops_per_worker" if peak else "measured fp32 matmul per worker"}
    uri, run_id = start_mlflow_run(params, f"pretrain-{params.profile}-{recipe[:8]}", previous, extra)
    write_json_atomic(join(run_uri, RUN_FILE), {"mlflow_run_id": run_id, "params": params.model_dump(mode="json")})
    print(f"pretrain: {plan.total_steps} steps × {plan.tokens_per_step} tokens ({train.workers} workers × "
          f"{train.micro_batch} rows × {plan.grad_accum} accumulation), run {run_uri}, MLflow run {run_id}", flush=True)
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


def add_arguments(parser) -> None:
    add_params_argument(parser)
    parser.add_argument("--resume", choices=("auto", "never"), default="auto",
                        help="auto (default): continue this recipe's last run from its newest valid checkpoint "
                             "if it did not finish; never: discard it and start over")


def main(args) -> int:
    from tasks.logs import stage_log

    params = load_params(args.params)
    with stage_log("pretrain", params):
        pretrain(params, resume=args.resume)
    return 0
