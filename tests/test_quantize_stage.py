"""`tinyllama quantize` on a trained micro model: GGUFs llama.cpp loads, the quality table, the gates,
MLflow (a run linked to the source's, registered versions) and bad input (exit 2, nothing written).

One project per module (eval_fixtures.make_project: tokenizer, val split, eval items, milestones 1K
and 4K, a pretrain run); the stage runs once on milestone 4K (the trained model) and the tests read
what it wrote. Bad-input runs point at other sources and must leave models/quantized as it was.
"""

import json
import shutil

import pytest
import yaml
from conftest import time_limit
from eval_fixtures import make_project

from tasks.cli import main as cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
TYPES = ["F16", "Q8_0", "Q4_0", "Q5_0"]


# A 64-wide, 2-layer model loses more to 8-bit weights and activations than the tiny profile's: its
# Q8_0 gate is looser here; the profile's own gate (params.yaml) is held by the pipeline test below.
MICRO_GATES = {"Q8_0": {"max_ppl_ratio": 1.02, "min_same_top": 0.97}}


def _write_params(project, path, metrics_dir=None, eval_settings=None, **quantize):
    raw = yaml.safe_load(project["params"].read_text())
    raw["quantize"].update({"source": "pretrain/4K", "threads": 1, "gates": MICRO_GATES, **quantize})
    raw["eval"].update(eval_settings or {})
    raw["mlflow"]["experiment"] = "eval-tests"  # make_project's experiment: its artifacts live under the project
    if metrics_dir is not None:
        raw["paths"]["metrics"] = str(metrics_dir)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory, eval_models):
    import os

    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path_factory.mktemp("quantize")
    project = make_project(root, eval_models, f"sqlite:///{root / 'mlflow.db'}")
    project["quantize_params"] = _write_params(project, root / "quantize.yaml", bf16=True, int8=True)
    with time_limit(900, "the quantize stage on the micro project"):
        project["rc"] = cli(["quantize", "--params", str(project["quantize_params"])])
    yield project
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def _metrics(project):
    return json.loads((project["root"] / "metrics" / "quantize.json").read_text())


def _quantized(project):
    return sorted(p.name for p in (project["root"] / "models" / "quantized").iterdir())


def test_writes_every_gguf_and_the_quality_table(project):
    assert project["rc"] == 0
    assert _quantized(project) == sorted(f"pretrain-4K-{t}.gguf" for t in TYPES)
    metrics = _metrics(project)
    assert list(metrics["types"]) == ["fp32", "bf16", "int8", *TYPES]
    rows = metrics["types"]
    assert rows["fp32"]["ppl_ratio"] == pytest.approx(1.0) and rows["fp32"]["kld"] == pytest.approx(0, abs=1e-12)
    assert rows["fp32"]["same_top"] == 1.0  # the baseline against itself
    for name in ("bf16", "int8", *TYPES):
        row = rows[name]
        assert row["ppl"] > 1 and 0 <= row["same_top"] <= 1 and row["kld"] >= 0 and 0 <= row["eval_avg"] <= 1, name
    # fewer bits, more divergence; every GGUF smaller than fp32
    assert rows["F16"]["kld"] < rows["Q8_0"]["kld"] < rows["Q5_0"]["kld"] < rows["Q4_0"]["kld"]
    assert rows["Q4_0"]["size_bytes"] < rows["Q5_0"]["size_bytes"] < rows["Q8_0"]["size_bytes"] \
        < rows["F16"]["size_bytes"] < rows["fp32"]["size_bytes"]
    # bf16: the same weights rounded to 8 mantissa bits, half fp32's bytes, close to it but not equal
    assert 0 < rows["bf16"]["kld"] < rows["Q4_0"]["kld"] and rows["bf16"]["same_top"] > 0.9
    assert 0.45 < rows["bf16"]["size_bytes"] / rows["fp32"]["size_bytes"] <= 0.5
    assert rows["Q8_0"]["gate"] == {**MICRO_GATES["Q8_0"], "passed": True, "failures": []}
    assert metrics["gates_passed"] is True and metrics["scored_tokens"] == rows["fp32"]["tokens"] > 100
    table = (project["root"] / "metrics" / "quantize_table.md").read_text()
    assert f"| Q8_0 | llama.cpp | {rows['Q8_0']['size_bytes'] / 1e6:.2f} |" in table
    assert all(f"| {name} | ours |" in table for name in ("fp32", "bf16", "int8")) and "none." in table


def test_fp32_eval_average_equals_the_evaluate_stage_score(project):
    """The engine adapter scores fp32 exactly like the milestone evals' HFLM on transformers."""
    assert cli(["evaluate", "--params", str(project["params"])]) == 0
    evaluated = json.loads((project["root"] / "metrics" / "eval.json").read_text())
    assert _metrics(project)["types"]["fp32"]["eval_avg"] == pytest.approx(evaluated["4K"]["avg"], abs=1e-9)


def test_lineage_in_the_file_and_mlflow_run_and_registry(project):
    from llama_cpp import Llama
    from mlflow import MlflowClient

    metrics = _metrics(project)
    llm = Llama(model_path=metrics["types"]["Q8_0"]["file"], n_ctx=32, vocab_only=True, verbose=False)
    try:
        assert llm.metadata["tinyllama.lineage.mlflow_run_id"] == project["run_id"]
        assert llm.metadata["tinyllama.lineage.source"] == "pretrain/4K"
    finally:
        llm.close()
    client = MlflowClient(tracking_uri=project["uri"])
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.tags["source_run_id"] == project["run_id"] and run.data.tags["gates_passed"] == "true"
    assert run.data.metrics["quantize/Q8_0/ppl_ratio"] == pytest.approx(metrics["types"]["Q8_0"]["ppl_ratio"])
    versions = client.search_model_versions("name='tinyllama-chat-gguf'")
    assert sorted(v.tags["type"] for v in versions) == sorted(TYPES)
    assert all(v.run_id == run.info.run_id for v in versions)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "gguf")}
    assert artifacts == {f"gguf/pretrain-4K-{t}.gguf" for t in TYPES}


def test_existing_gguf_is_refused_without_overwrite(project, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (project["root"] / "models" / "quantized").iterdir()}
    assert cli(["quantize", "--params", str(project["quantize_params"])]) == 2
    assert "pretrain-4K-F16.gguf: exists" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (project["root"] / "models" / "quantized").iterdir()} == before


def _bad_source(project, name):
    source = shutil.copytree(project["root"] / "models" / "pretrain" / "4K", project["root"] / "bad" / name)
    return source


@pytest.mark.parametrize("case", ["unknown type", "other architecture", "missing tensor", "not in registry",
                                  "no such dir", "no cuda here"])
def test_bad_input_exits_2_naming_it_and_writes_nothing(project, case, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    quantize, expected, eval_settings = {"name": "bad"}, None, None
    if case == "no cuda here":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: eval.device cuda is not bad input here")
        eval_settings = {"device": "cuda", "resources": {"CPU": 1, "GPU": 1}}
        expected = "eval.device: cuda requested, but this machine has no CUDA"
    elif case == "unknown type":
        quantize["types"], expected = ["Q8_0", "Q3_K"], "quantize.types: unknown quant type 'Q3_K'"
    elif case == "other architecture":
        source = _bad_source(project, "gpt2")
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
        quantize["source"], expected = str(source), "model_type: 'gpt2' is not 'llama'"
    elif case == "missing tensor":
        source = _bad_source(project, "holed")
        state = load_file(source / "model.safetensors")
        del state["model.layers.0.self_attn.k_proj.weight"]
        save_file(state, source / "model.safetensors")
        quantize["source"], expected = str(source), "missing tensor model.layers.0.self_attn.k_proj.weight"
    elif case == "not in registry":
        quantize["source"], expected = "models:/tinyllama-chat@nobody", "models:/tinyllama-chat@nobody"
    else:
        quantize["source"], expected = "pretrain/9T", "quantize.source: 'pretrain/9T'"
    params = _write_params(project, tmp_path / "bad.yaml", eval_settings=eval_settings, **quantize)
    before = _quantized(project)
    assert cli(["quantize", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert _quantized(project) == before
    assert not list((project["root"] / "models" / "quantized").glob(".*"))  # no temp file left


def test_a_missed_gate_fails_the_stage_and_registers_nothing(project, tmp_path, capsys):
    from mlflow import MlflowClient

    params = _write_params(project, tmp_path / "strict.yaml", metrics_dir=tmp_path / "metrics", types=["Q4_0"],
                           int8=False, evaluate=False, name="strict", registered_model="strict-gguf",
                           gates={"Q4_0": {"max_ppl_ratio": 1.0, "min_same_top": 1.0}})
    assert cli(["quantize", "--params", str(params)]) == 1
    assert "quality gate failed: Q4_0: PPL ratio" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics" / "quantize.json").read_text())
    assert metrics["gates_passed"] is False and metrics["types"]["Q4_0"]["gate"]["passed"] is False
    assert "**FAIL**" in (tmp_path / "metrics" / "quantize_table.md").read_text()
    assert MlflowClient(tracking_uri=project["uri"]).search_model_versions("name='strict-gguf'") == []


def test_eval_limit_scores_every_type_on_the_first_items_of_each_task(project, tmp_path):
    """`quantize.eval_limit` (the GPU profile's 200): the types' averages over that many items a task, said in the
    table's settings note; the evaluate stage's own `eval.limit` is left alone."""
    params = _write_params(project, tmp_path / "limited.yaml", metrics_dir=tmp_path / "metrics", types=["Q8_0"],
                           int8=False, eval_limit=2, name="limited", registered_model="limited-gguf")
    assert cli(["quantize", "--params", str(params)]) == 0
    metrics = json.loads((tmp_path / "metrics" / "quantize.json").read_text())
    assert "first 2 items per task" in metrics["eval_settings"]
    assert all(0 <= row["eval_avg"] <= 1 for row in metrics["types"].values())
    assert "first 2 items per task" in (tmp_path / "metrics" / "quantize_table.md").read_text()
    assert "first" not in _metrics(project)["eval_settings"]  # the module's run: eval.limit null, every item


def test_the_tiny_pipeline_quantizes_its_champion_within_the_gates(pipeline_repo):
    """`dvc repro` of the tiny profile ran the stage on the registry's champion chat model with
    params.yaml's gates (Q8_0: PPL ratio ≤ 1.005, same top ≥ 98%); llama.cpp loads every file it wrote,
    whose lineage names the alignment stage that trained the champion and that stage's DVC hash."""
    from tasks.quantize.engines import load_llama_cpp

    root = pipeline_repo.root
    metrics = json.loads((root / "metrics" / "quantize.json").read_text())
    assert metrics["gates_passed"] is True and metrics["types"]["Q8_0"]["gate"]["passed"] is True
    assert metrics["types"]["Q8_0"]["ppl_ratio"] <= 1.005 and metrics["types"]["Q8_0"]["same_top"] >= 0.98
    files = sorted((root / "models" / "quantized").glob("*.gguf"))
    assert [f.name for f in files] == sorted(f"tinyllama-chat-champion-{t}.gguf" for t in TYPES)
    for path in files:
        llm = load_llama_cpp(path, n_ctx=64, verbose=False)
        try:
            assert llm.metadata["tinyllama.lineage.source"] == "models:/tinyllama-chat@champion"
            assert llm.metadata["tinyllama.lineage.dvc_stage"] in ("sft", "dpo")
            assert len(llm.metadata["tinyllama.lineage.dvc_stage_hash"]) == 64
        finally:
            llm.close()
