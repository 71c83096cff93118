"""The deploy stage's artifacts: the Serve config (`serve deploy`-able) and the lineage file.

The config is Ray Serve's own schema (`ray.serve.schema.ServeDeploySchema`, checked before it is
written): one application built by `serving.app:build_app` with the `deploy:` params as its args,
the replica count (or an autoscaling range), CPUs per replica and the overload limits on its deployment
(`max_ongoing_requests`, `max_queued_requests`, answered by Serve with 429 and Retry-After). Paths in it are
absolute: Serve's replicas do not run in the repo.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tasks.deploy.champion import REGISTRY_PREFIX, resolve
from tasks.deploy.ray_serve import APPLICATION
from tasks.errors import UserError
from tasks.files import write_atomic
from tasks.layout import Layout
from tasks.params import Params, format_tokens


def model_ref(params: Params) -> str:
    """The configured model, or the last pretrain milestone when none is configured."""
    if params.deploy.model:
        return params.deploy.model
    return str(Layout.from_params(params).milestone_dir(format_tokens(params.train.milestones[-1])))


def registry_lineage(ref: str, tracking_uri: str) -> dict:
    """Registered model name, version, alias and source run of a `models:/` reference."""
    from mlflow.tracking import MlflowClient

    spec = ref.removeprefix(REGISTRY_PREFIX)
    client = MlflowClient(tracking_uri)
    if "@" in spec:
        name, alias = spec.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = spec.partition("/")
        alias, version = None, client.get_model_version(name, number)
    return {"registered_model": name, "registry_version": int(version.version), "registry_alias": alias,
            "mlflow_run_id": version.run_id, **{f"tag.{k}": v for k, v in (version.tags or {}).items()}}


def lineage(ref: str, directory: Path, tracking_uri: str) -> dict:
    info = {"model_ref": ref, "model_dir": str(directory.resolve())}
    if ref.startswith(REGISTRY_PREFIX):
        info.update(registry_lineage(ref, tracking_uri))
    return info


def serve_args(params: Params, directory: Path, lineage_path: Path, tracking_uri: str) -> dict:
    deploy = params.deploy
    draft = deploy.draft
    if draft and draft != "prompt-lookup":
        draft = str(resolve(draft, tracking_uri, "deploy.draft").resolve())
    return {"model": str(directory.resolve()), "draft": draft, "draft_tokens": deploy.draft_tokens,
            "quant": deploy.quant, "api_key_env": deploy.api_key_env, "slots": deploy.slots,
            "max_waiting": deploy.max_waiting, "cpus": deploy.cpus_per_replica, "device": deploy.device,
            "dtype": deploy.dtype, "compile": deploy.compile,
            "stream_interval": deploy.stream_interval, "prompt_cache": deploy.prompt_cache,
            "max_queued_requests": deploy.max_queued_requests, "retry_after_s": deploy.retry_after_s,
            "max_body_bytes": deploy.max_body_bytes, "max_prompt_tokens": deploy.max_prompt_tokens,
            "max_stop_chars": deploy.max_stop_chars, "max_top_logprobs": deploy.max_top_logprobs,
            "lineage_file": str(lineage_path.resolve())}


def serve_config(params: Params, args: dict, host: str, port: int) -> dict:
    """A Serve config for `serve deploy` (its args checked by the app's own parser, the whole by Ray's schema)."""
    from ray.serve.schema import ServeDeploySchema

    from serving.app import actor_options, build_app, parse_args

    try:
        settings = parse_args(args)
    except ValueError as exc:
        raise UserError(f"deploy: {exc}") from None

    deploy = params.deploy
    deployment: dict = {"name": "tinyllama", "ray_actor_options": actor_options(settings),
                        "max_ongoing_requests": settings.max_ongoing_requests(),
                        "max_queued_requests": settings.max_queued_requests,
                        "backpressure_config": settings.backpressure()}
    if deploy.max_replicas > deploy.num_replicas:
        deployment["autoscaling_config"] = {"min_replicas": deploy.num_replicas, "max_replicas": deploy.max_replicas,
                                            "target_ongoing_requests": deploy.slots}
    else:
        deployment["num_replicas"] = deploy.num_replicas
    application = {"name": APPLICATION, "route_prefix": "/",
                   "import_path": f"{build_app.__module__}:{build_app.__name__}",
                   "args": args, "deployments": [deployment]}
    config = {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port}, "applications": [application]}
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as exc:
        raise UserError(f"deploy: the Serve config is invalid: {str(exc).splitlines()[0]}") from None
    return config


def write_yaml(path: Path, config: dict) -> Path:
    return write_atomic(path, yaml.safe_dump(config, sort_keys=False).encode())
