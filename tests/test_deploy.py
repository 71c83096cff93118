"""The deploy stage, `tinyllama serve`'s argument checks, the Serve configs and the RayService manifest.

Fast: the configs pass Ray Serve's own schema and name our application builder; bad flags and
params are one line and exit 2. Slow: what the shared pipeline run's deploy stage measured (Ray's own
`serve deploy`, the openai-client check, metrics/serve.json), and a model that fails to load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.cli import main as cli
from tasks.errors import UserError
from tasks.params import load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path, **deploy):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {"data": str(tmp_path / "data"), "models": str(tmp_path / "models"),
                    "metrics": str(tmp_path / "metrics")}
    raw["deploy"].update(deploy)
    return raw


def test_serve_config_passes_rays_schema_and_builds_our_app(tmp_path, served_model_dir):
    from ray.serve.schema import ServeDeploySchema

    from tasks.deploy.stage import write_artifacts

    params = parse_params(_params(tmp_path, model=str(served_model_dir), max_replicas=3, draft="prompt-lookup"))
    path, config = write_artifacts(params)
    assert yaml.safe_load(path.read_text()) == config
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app" and app.args["model"] == str(served_model_dir.resolve())
    assert app.args["draft"] == "prompt-lookup"
    (deployment,) = app.deployments
    assert deployment.autoscaling_config == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8}
    deploy = params.deploy
    assert deployment.max_queued_requests == deploy.max_queued_requests
    assert deployment.backpressure_config.status_code == 429
    assert deployment.backpressure_config.retry_after_s == deploy.retry_after_s
    passed = {"stream_interval", "prompt_cache", "max_body_bytes", "max_prompt_tokens", "max_stop_chars",
              "max_top_logprobs", "max_queued_requests", "retry_after_s"}
    assert {k: app.args[k] for k in passed} == deploy.model_dump(include=passed)
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    lineage = json.loads((tmp_path / "models" / "deploy" / "lineage.json").read_text())
    assert lineage == {"model_ref": str(served_model_dir), "model_dir": str(served_model_dir.resolve())}


def test_every_profile_has_a_valid_deploy_section():
    for profile in ("params.yaml", "configs/tinyllama-1.1b.yaml"):
        deploy = load_params(ROOT / profile).deploy
        assert deploy.host and deploy.slots >= 1
    assert load_params(ROOT / "configs/tinyllama-1.1b.yaml").deploy.model == "models:/tinyllama-chat@champion"


def test_rayservice_manifest_runs_our_application_builder():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app"
    from serving.app import actor_options, parse_args
    from tasks.deploy.config import serve_args

    args = parse_args(app.args)
    # what the deploy stage writes for the 1.1B profile (and checked through its gate): the same settings,
    # but the model dir (the init container's) and the lineage file (the head's)
    profile = load_params(ROOT / "configs/tinyllama-1.1b.yaml")
    written = parse_args(serve_args(profile, Path(args.model), Path("lineage.json"), "sqlite:///unused.db"))
    assert args.model_dump(exclude={"lineage_file"}) == written.model_dump(exclude={"lineage_file"})
    assert (args.device, args.dtype, args.compile) == ("cuda", "bf16", True), "the 1.1B serves on GPUs"
    (deployment,) = app.deployments
    options = deployment.ray_actor_options
    assert {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus, "runtime_env": options.runtime_env} == \
        actor_options(args)
    assert deployment.max_ongoing_requests == args.max_ongoing_requests()
    assert deployment.max_queued_requests == args.max_queued_requests and args.stream_interval > 1
    assert deployment.backpressure_config.model_dump() == args.backpressure()
    job = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayjob.yaml").read_text())
    image = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    cluster = service["spec"]["rayClusterConfig"]
    images = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]]
    images += [c["image"] for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert set(images) == {image} and cluster["rayVersion"] == job["spec"]["rayClusterSpec"]["rayVersion"]


def test_a_host_beyond_loopback_needs_an_api_key(tmp_path):
    with pytest.raises(UserError, match="deploy.api_key_env: required when deploy.host \\(0.0.0.0\\)"):
        parse_params(_params(tmp_path, host="0.0.0.0"))
    for host, key in (("0.0.0.0", "TINYLLAMA_API_KEY"), ("127.0.0.1", None), ("::1", None), ("localhost", None)):
        assert parse_params(_params(tmp_path, host=host, api_key_env=key)).deploy.host == host


def test_build_app_rejects_bad_args_naming_the_field():
    from serving.app import build_app

    with pytest.raises(ValueError, match="serve args.slots"):
        build_app({"model": "/x", "slots": 0})
    with pytest.raises(ValueError, match="serve args.colour"):
        build_app({"model": "/x", "colour": "red"})


def test_serve_cli_bad_input_is_one_line_and_exit_2(tmp_path, served_model_dir, capsys):
    cases = [
        (["--model", str(tmp_path / "nope")], "--model: " + str(tmp_path / "nope") + " is not a model dir"),
        (["--model", str(served_model_dir), "--slots", "0"], "--slots: Input should be greater than or equal to 1"),
        (["--model", str(served_model_dir), "--draft", str(tmp_path)], "--draft: "),
        (["--model", str(served_model_dir), "--api-key-env", "TINYLLAMA_SURELY_UNSET"],
         "--api-key-env: environment variable TINYLLAMA_SURELY_UNSET is not set"),
    ]
    for extra, message in cases:
        assert cli(["serve", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_deploy_without_a_model_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params(tmp_path, model=str(tmp_path / "missing"))))
    assert cli(["deploy", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "deploy.model: " in err and "not a model dir" in err and err.count("\n") == 1
    assert not (tmp_path / "models" / "deploy").exists() and not (tmp_path / "metrics").exists()


def test_without_a_cluster_the_flow_prints_the_command_that_serves(tmp_path):
    from flows.serve import how_to_serve
    from tasks.deploy.stage import write_artifacts

    milestone = tmp_path / "models" / "pretrain" / "1M"
    milestone.mkdir(parents=True)
    (milestone / "config.json").write_text("{}")
    params = parse_params(_params(tmp_path, port=8123, model=None))  # null: the last milestone
    write_artifacts(params)
    message = how_to_serve(params, tmp_path)
    assert f".venv/bin/tinyllama serve --model {milestone} --host 127.0.0.1 --port 8123" in message
    assert "http://127.0.0.1:8123/v1" in message


def test_the_printed_serve_command_carries_every_deploy_setting_the_server_takes(tmp_path):
    """The command the flow prints (or starts with --keep-serving), parsed by `tinyllama serve`'s own parser,
    gives back each deploy setting it takes (a 1.1B-like section: cuda, bf16, compile, no prompt cache, ...);
    settings at their defaults are left out of it."""
    import argparse

    from flows.serve import SERVE_FLAGS, serve_command
    from tasks.deploy.serve import add_arguments
    from tasks.deploy.stage import write_artifacts

    milestone = tmp_path / "models" / "pretrain" / "1M"
    milestone.mkdir(parents=True)
    (milestone / "config.json").write_text("{}")
    write_artifacts(parse_params(_params(tmp_path, model=None)))  # the lineage the command names the model from
    changed = dict(draft="prompt-lookup", draft_tokens=6, quant="int8", api_key_env="SERVE_KEY", slots=3,
                   max_waiting=5, cpus_per_replica=1, device="cuda", dtype="bf16", compile=True, stream_interval=4,
                   prompt_cache=False, max_queued_requests=7, retry_after_s=3, max_body_bytes=4096,
                   max_prompt_tokens=100, max_stop_chars=9, max_top_logprobs=2)
    assert set(changed) == set(SERVE_FLAGS)
    params = parse_params(_params(tmp_path, **changed))
    deploy = params.deploy
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dest = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    parsed = parser.parse_args(serve_command(params, tmp_path)[2:])
    assert {field: getattr(parsed, dest[flag]) for field, flag in SERVE_FLAGS.items()} == {
        field: getattr(deploy, field) for field in SERVE_FLAGS}
    assert parsed.model == str(milestone)
    default = serve_command(parse_params(_params(tmp_path)), tmp_path)
    assert not set(default) & set(SERVE_FLAGS.values()), default


def test_on_a_cluster_the_flow_finds_the_dashboard_the_head_registered():
    """`serve deploy`'s default is localhost:8265; a head whose dashboard is elsewhere (the runbook's listens on
    its private IP) is found by asking the cluster, which is what the flow does without --dashboard-address."""
    import ray
    from ray.cluster_utils import Cluster
    from servers import free_port

    from flows.serve import dashboard_url

    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_port": port})
    try:
        assert dashboard_url(cluster.address) == f"http://127.0.0.1:{port}"
        assert not ray.is_initialized(), "the flow's process is left as it was"
    finally:
        cluster.shutdown()


def test_the_gate_compares_every_request_and_names_the_worst():
    """The gate's comparison (pure): the largest difference and where, a request scored one way only, NaN."""
    from tasks.deploy.gate import compare

    reference = {("a", 0, 0): -1.0, ("a", 0, 1): -2.0, ("b", 3, 1): -3.0}
    close = {key: value + 1e-4 * i for i, (key, value) in enumerate(reference.items())}
    passed = compare(close, reference, 1e-3)
    assert passed.passed and passed.compared == 3 and passed.worst == ("b", 3, 1)
    assert passed.max_abs_diff == pytest.approx(2e-4)
    off = {**close, ("a", 0, 1): -2.0 + 5e-3}
    failed = compare(off, reference, 1e-3)
    assert not failed.passed and failed.worst == ("a", 0, 1) and failed.max_abs_diff == pytest.approx(5e-3)
    assert "5.00e-03" in failed.describe() and "a item 0 choice 1" in failed.describe()
    assert compare(off, reference, 1e-2).passed  # the tolerance decides
    short = {k: v for k, v in reference.items() if k != ("b", 3, 1)}
    missing = compare(short, reference, 1.0)
    assert not missing.passed and missing.missing == (("b", 3, 1),) and "b item 3 choice 1" in missing.describe()
    assert not compare({**reference, ("a", 0, 0): float("nan")}, reference, 1.0).passed



def test_the_gate_reads_the_score_recorded_for_the_served_model(tmp_path):
    """Beside the gate's scores: the alignment stage's average for a registered variant (its registry tags
    name the stage and variant), the evaluate stage's for a milestone dir, nothing for an unknown model."""
    from tasks.deploy.gate import recorded_average

    params = parse_params(_params(tmp_path))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "dpo.json").write_text(json.dumps({"chat-1M": {"base": {"avg": 0.5},
                                                                           "dpo": {"avg": 0.625}}}))
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"1M": {"tokens": 1, "avg": 0.375}}))
    registered = {"model_dir": "/cache/tinyllama-chat/3", "tag.stage": "dpo", "tag.variant": "chat-1M"}
    assert recorded_average(params, registered) == {"avg": 0.625, "from": "dpo.json chat-1M.dpo.avg"}
    assert recorded_average(params, {"model_dir": str(tmp_path / "models" / "pretrain" / "1M")}) == \
        {"avg": 0.375, "from": "eval.json 1M.avg"}
    assert recorded_average(params, {**registered, "tag.variant": "chat-2M"}) is None
    assert recorded_average(params, {**registered, "tag.stage": "sft"}) is None  # no sft.json here


@pytest.mark.slow
def test_the_pipelines_deploy_stage_served_checked_and_measured_the_champion(pipeline_repo):
    """The shared run's deploy stage (`tinyllama deploy` through dvc.yaml: Ray's own `serve deploy`, the
    openai-client checks, stopped after) left metrics/serve.json: every check passed, every measure was
    taken (how fast depends on the machine, so no limit is asserted), and the served model is the champion."""
    root = pipeline_repo.root
    metrics = json.loads((root / "metrics" / "serve.json").read_text())
    lineage = json.loads((root / "models" / "deploy" / "lineage.json").read_text())
    assert metrics["model_ref"] == lineage["model_ref"] == load_params(root / "params.yaml").deploy.model
    assert metrics["time_to_ready_s"] > 0 and metrics["ttft_s"] > 0
    assert metrics["tokens_per_s"]["1"] > 0 and metrics["tokens_per_s"]["8"] > 0
    checks = metrics["checks"]
    assert checks["stream_equal"] is True and checks["bad_request"] == 400
    assert checks["chat_finish_reason"] in ("stop", "length")
    assert lineage.items() <= checks["lineage"].items(), "the server reports the deploy stage's lineage"
    assert checks["lineage"]["base_milestone"] in {p.name for p in (root / "models" / "pretrain").iterdir()}
    assert Path(metrics["serve_config"]).is_file()
    params = load_params(root / "params.yaml")
    gate = metrics["gate"]  # lm-eval through the API scored every request as in-process scoring did
    assert gate["passed"] and gate["max_abs_diff"] <= params.deploy.gate.tolerance and gate["scores_equal"]
    assert gate["items_per_task"] == params.deploy.gate.items and gate["requests"] >= len(params.eval.tasks)
    assert set(gate["scores"]["served"]) == set(params.eval.tasks)
    assert gate["scores"]["served"] == gate["scores"]["in_process"]
    stage, variant = lineage["tag.stage"], lineage["tag.variant"]  # the alignment stage that registered it
    recorded = json.loads((root / "metrics" / f"{stage}.json").read_text())[variant][stage]["avg"]
    assert gate["recorded"]["avg"] == recorded
    print(f"\ndeploy gate: largest difference {gate['max_abs_diff']:.2e} over {gate['requests']} requests; "
          f"avg {gate['avg']['served']:.4f} served = {gate['avg']['in_process']:.4f} in process on the first "
          f"{gate['items_per_task']} items per task; recorded {recorded:.4f} ({gate['recorded']['from']})")


@pytest.mark.slow
def test_a_model_that_fails_to_load_is_a_503_then_one_line_and_exit_2(tmp_path, served_model_dir):
    """The replica loads in the background: /health answers 503 ("failed", with the reason) and
    `tinyllama serve` ends with one error line naming the model (after Ray's own start-up lines)."""
    import shutil

    from servers import free_port

    broken = tmp_path / "broken"
    shutil.copytree(served_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([str(Path(sys.executable).parent / "tinyllama"), "serve", "--model", str(broken),
                             "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (last.startswith("tinyllama serve: error: --model: the server did not come up: loading")
            and str(broken) in last)
    assert "Traceback" not in result.stdout + result.stderr
