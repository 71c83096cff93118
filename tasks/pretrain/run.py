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

from tasks.files import read_json, write_json_atomic
from tasks.layout import Layout, join, with_absolute_paths
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


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def prepare_run_dir(run_uri: str, resume: str) -> dict | None:
    """Returns the previous run's record when resuming it; clears the dir when starting over."""
    fs, path = _fs(run_uri)
    record = read_json(join(run_uri, RUN_FILE)) if fs.exists(f"{path}/{RUN_FILE}") else None
    finished = fs.exists(f"{path}/{COMPLETE_FILE}")
    if record is not None and resume == "auto" and not finished:
        return record
    if fs.exists(path):
        reason = "--resume never" if resume == "never" else "the previous identical run had finished"
        log.warning("starting over in %s (%s)", run_uri, reason)
        fs.rm(path, recursive=True)
    return None


def start_mlflow_run(params: Params, previous: dict | None, extra: dict, run_name: str | None = None,
                     tags: dict | None = None, values: dict | None = None) -> tuple[str, str]:
    """The run a training job logs to: resumed when the previous attempt's run still exists, else a new
    one named `run_name` (default: the pretrain run) with `tags`, whose params are `values` (default:
    every param of the profile) flattened, plus `extra`. Returns (tracking uri, run id)."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.tracking import configure_mlflow, tracking_uri

    experiment_id = configure_mlflow(params)
    uri = tracking_uri(params)
    client = MlflowClient(uri)
    if previous is not None:
        try:
            client.get_run(previous["mlflow_run_id"])
            client.update_run(previous["mlflow_run_id"], status="RUNNING")
            return uri, previous["mlflow_run_id"]
        except MlflowException:
            log.warning("MLflow run %s of the resumed run is gone; logging to a new run", previous["mlflow_run_id"])
    run = client.create_run(experiment_id, run_name=run_name or f"pretrain-{params.profile}",
                            tags=tags or {"stage": "pretrain"})
    values = params.model_dump(mode="json") if values is None else values
    flat = {**flatten(values), **{k: str(v) for k, v in extra.items()}}
    entries = [Param(k, v) for k, v in sorted(flat.items())]
    for start in range(0, len(entries), 100):  # MLflow's per-request param limit
        client.log_batch(run.info.run_id, params=entries[start:start + 100])
    return uri, run.info.run_id


def fit(params: Params, run_name: str, storage: str, loop_config):
    """Train `loop_config.objective` with the one loop on Ray Train (TorchTrainer): `train.workers`
    workers, failures retried from the newest checkpoint, `train.keep_checkpoints` kept under
    `storage/run_name`. Every objective (pretraining, SFT, DPO) runs through here. Returns Ray's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasks.pretrain.loop import train_loop

    train = params.train
    resources = {"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})}
    trainer = TorchTrainer(
        lambda config: train_loop(config["loop"]), train_loop_config={"loop": loop_config},
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints)))
    return trainer.fit()


def pretrain(params: Params, resume: str = "auto") -> dict:
    """Run the stage; returns what it wrote to `{paths.metrics}/pretrain.json`."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from tasks.pretrain.loop import LoopConfig
    from tasks.pretrain.objective import PretrainObjective
    from tasks.ray_cluster import check_train_resources, ray_session

    started = time.perf_counter()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every progress line prints twice
    params = with_absolute_paths(params)  # Ray workers do not share the driver's working directory
    layout = Layout.from_params(params)
    train = params.train
    data = open_prepared(params)  # every input check happens before anything is written
    plan = StepPlan.from_params(params)
    evals = train.eval_milestones_during_training
    with ray_session(params, extra_cpus=1 if evals else 0):
        check_train_resources(params)
        run_name = f"run-{fingerprint(params, data)[:16]}"
        run_uri = layout.run_dir(run_name)
        previous = prepare_run_dir(run_uri, resume)
        peak = params.plan.peak_tflops_per_worker * 1e12 if train.use_gpu else None
        extra = {"derived.total_steps": plan.total_steps, "derived.grad_accum": plan.grad_accum,
                 "derived.tokens_per_step": plan.tokens_per_step, "derived.run_dir": run_uri,
                 "derived.parameters": params.llama_config(data.vocab_size).num_params(),
                 "derived.mfu_peak": "configured plan.peak_tflops_per_worker" if peak else "measured fp32 matmul per worker"}
        uri, run_id = start_mlflow_run(params, previous, extra)
        write_json_atomic(join(run_uri, RUN_FILE), {"mlflow_run_id": run_id, "params": params.model_dump(mode="json")})
        print(f"pretrain: {plan.total_steps} steps × {plan.tokens_per_step} tokens ({train.workers} workers × "
              f"{train.micro_batch} rows × {plan.grad_accum} accumulation), run {run_uri}, MLflow run {run_id}", flush=True)
        loop_config = LoopConfig(params=params.model_dump(mode="json"), objective=PretrainObjective(data, evals),
                                 run_uri=run_uri, layout=layout, tracking_uri=uri, mlflow_run_id=run_id,
                                 peak_flops_per_worker=peak)
        client = MlflowClient(uri)
        try:
            result = fit(params, run_name, train.checkpoint_dir, loop_config)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        wall = time.perf_counter() - started
        reported = result.metrics
        metrics = {"mlflow_run_id": run_id, **{k: reported.get(k) for k in METRIC_KEYS}, "wall_time_s": round(wall, 2)}
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"final/{k}", float(v), now, metrics["steps"])
                                          for k, v in metrics.items() if isinstance(v, (int, float))])
        client.set_terminated(run_id, status="FINISHED")
        write_json_atomic(join(run_uri, COMPLETE_FILE), metrics)
    out = write_json_atomic(layout.metrics_file("pretrain"), metrics)
    print(f"pretrain: done in {wall:.0f}s; final train loss {metrics['final_train_loss']:.4f}, val loss "
          f"{metrics['final_val_loss']:.4f}; metrics -> {out}", flush=True)
    return metrics


def add_arguments(parser) -> None:
    add_params_argument(parser)
    parser.add_argument("--resume", choices=("auto", "never"), default="auto",
                        help="auto (default): continue this recipe's last run from its newest valid checkpoint "
                             "if it did not finish; never: discard it and start over")


def main(args) -> int:
    pretrain(load_params(args.params), resume=args.resume)
    return 0
