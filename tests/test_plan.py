"""`tinyllama plan`: the dry run of the real recipe, through the CLI a user runs."""

import json
import subprocess
import sys

import pytest
import yaml


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_tinyllama_plan_matches_the_paper():
    result = run_cli("plan", "--params", "configs/tinyllama-1.1b.yaml", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["parameters"] == 1_100_048_384
    assert plan["tokens_per_step"] == 2_097_152
    assert plan["total_steps"] == 1_430_512
    assert plan["grad_accum"] == 8
    assert 89.5 < plan["days"] < 91.0
    assert list(plan["milestones"]) == ["105B", "503B", "1T", "1.5T", "2T", "2.5T", "3T"]
    assert plan["milestones"]["105B"] == 50_068  # ceil(105e9 / 2_097_152)
    assert 0.5 < plan["mfu_at_that_speed"] < 0.6  # the anchor: 24k tok/s/GPU is ~56% MFU on an A100
    assert plan["memory_per_gpu_gib"]["total"] < 40


def test_plan_prices_hsdp_against_fsdp_and_accumulations_unsharded_gradients():
    """The 1.1B profile's mesh (2 nodes × 8) keeps all-gathers inside a node: across nodes only the gradient
    all-reduce (4 B × params × 2 (R-1)/R per node), well under FSDP2-over-16's gathers."""
    plan = json.loads(run_cli("plan", "--params", "configs/tinyllama-1.1b.yaml", "--json").stdout)
    params = plan["parameters"]
    assert plan["mesh"] == {"replicate": 2, "shard": 8}
    traffic = plan["traffic_per_step_gb"]
    assert traffic["hsdp"]["across_nodes"] == round(4 * params * 2 * (2 - 1) / 2 / 1e9, 2)
    assert traffic["fsdp"]["across_nodes"] > 4 * traffic["hsdp"]["across_nodes"]
    assert traffic["hsdp"]["within_node"] > traffic["fsdp"]["within_node"]  # NVLink takes what TCP no longer does
    memory = plan["memory_per_gpu_gib"]
    assert memory["grads_unsharded_accumulating"] == round(4 * params / 2**30, 2)  # accumulation: 8 micro-steps
    assert memory["weights_fp32"] == round(4 * params / 8 / 2**30, 2)  # sharded over a node's 8 GPUs


def test_plan_text_and_speed_override():
    result = run_cli("plan", "--params", "configs/tinyllama-1.1b.yaml", "--tokens-per-sec", "48000")
    assert result.returncode == 0, result.stderr
    assert "1,100,048,384" in result.stdout and "45.2 days" in result.stdout


@pytest.mark.parametrize("model,needle", [
    ({"preset": "nope"}, "model.preset: unknown preset 'nope'"),
    ({"preset": "tiny", "overrides": {"n_head": 7}}, "model.n_head: 7 does not divide"),
    ({"preset": "tiny", "overrides": {"n_kv_head": 4}}, "model.n_kv_head: 4 does not divide"),
])
def test_plan_bad_model_exits_2_with_one_line(tmp_path, model, needle):
    raw = yaml.safe_load(open("params.yaml"))
    raw["model"] = model
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    result = run_cli("plan", "--params", str(params))
    assert result.returncode == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_one_gpu_benchmark_runs_the_recipe_on_a_1x1_hsdp_mesh(tmp_path):
    """`benchmarks/pretrain.py --gpu-1b` (world 1) validates with the 1.1B recipe's settings and HSDP's
    code path, without a GPU; its memory plan is the one the benchmark compares against."""
    import importlib.util
    from pathlib import Path

    from tasks.pretrain.plan import memory_per_gpu

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("bench_pretrain", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    params = bench.gpu_1b_params(tmp_path, steps=30, micro_batch=4, activation_checkpointing=False)
    train = params.train
    assert (train.workers, train.mesh.replicate, train.mesh.shard) == (1, 1, 1)
    assert (train.strategy, train.precision, train.compile, train.use_gpu) == ("fsdp", "bf16", True, True)
    assert params.grad_accum == 1 and params.llama_config().num_params() == 1_100_048_384
    assert 0 < memory_per_gpu(params, params.llama_config().num_params())["total"] < 40
    # Under Ray on one machine: no p4d `trainer` label to ask for, one mid-run checkpoint, and the one
    # milestone on the last step, a checkpoint step (the sharded export is converted from it).
    assert train.resources_per_worker == {} and not train.eval_milestones_during_training
    steps = train.total_tokens // train.global_batch_tokens
    assert steps == 30 and train.milestones == [train.total_tokens] and train.checkpoint_every_steps == 20
