"""`tinyllama evaluate`: every milestone scored, cached by weights hash, reported, logged to MLflow.

A project in tmp_path holds two milestones over the same tokenizer: `1K` is a random model, `4K`
the model trained on the items' answers; so the table and the MLflow curve must rise with tokens.
"""

import csv
import io
import json

import pytest
import torch
from eval_fixtures import ROOT, make_project, random_model, write_checkpoint, write_eval_params

from tasks.cli import main as cli

REPORTS = {"eval.json", "eval_table.md", "eval_table.csv", "eval_plot.png"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One sqlite store for the module (creating one runs MLflow's migrations: seconds); a run per test."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def project(tmp_path, eval_models, tracking_uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_project(tmp_path, eval_models, tracking_uri)


def _client(project):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=project["uri"])


def _perplexity_with_model_code(root, milestone) -> float:
    import math

    import pyarrow.parquet as pq

    from model.hf import load_hf

    prepared = root / "data" / "prepared"
    shards = json.loads((prepared / "manifest.json").read_text())["sources"]["facts"]["splits"]["val"]["shards"]
    rows = torch.tensor([row for shard in shards for row in pq.read_table(prepared / shard)["tokens"].to_pylist()])
    with torch.inference_mode():
        return math.exp(load_hf(root / "models" / "pretrain" / milestone).loss(rows).item())


def test_scores_rise_with_training_and_land_everywhere(project):
    root, tasks = project["root"], project["tasks"]
    assert cli(["evaluate", "--params", str(project["params"])]) == 0

    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert list(metrics) == ["1K", "4K"]
    first, last = metrics["1K"], metrics["4K"]
    assert (first["tokens"], last["tokens"]) == (1024, 4096)
    assert set(last) == {"tokens", *tasks, "avg", "val_ppl"}
    assert last["avg"] == pytest.approx(sum(last[t] for t in tasks) / len(tasks))
    assert last["avg"] >= 0.9 and last["avg"] >= first["avg"] + 0.3
    # An untrained model is near uniform over the 512-token vocabulary; the trained one knows the text
    # (rows are packed, so they start mid-sentence: not perfectly). Our own loss code must agree.
    assert 0.8 * 512 < first["val_ppl"] < 1.25 * 512
    assert last["val_ppl"] < first["val_ppl"] / 2
    assert last["val_ppl"] == pytest.approx(_perplexity_with_model_code(root, "4K"), rel=1e-4)

    rows = list(csv.DictReader(io.StringIO((root / "metrics" / "eval_table.csv").read_text())))
    assert [r["milestone"] for r in rows] == ["1K", "4K"]
    assert float(rows[1][tasks[0]]) == pytest.approx(last[tasks[0]])
    table = (root / "metrics" / "eval_table.md").read_text()
    assert f"| 4K | 4.096K | {100 * last[tasks[0]]:.2f} |" in table
    assert (root / "metrics" / "eval_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = _client(project)
    for task in tasks:
        history = client.get_metric_history(project["run_id"], f"eval/{task}/acc_norm")
        assert sorted((m.step, m.value) for m in history) == [(1024, first[task]), (4096, last[task])]
    assert sorted(m.step for m in client.get_metric_history(project["run_id"], "eval/avg")) == [1024, 4096]
    assert {a.path for a in client.list_artifacts(project["run_id"], "eval")} == {f"eval/{name}" for name in REPORTS}


def test_rerun_reuses_scores_for_the_same_weights_only(project, eval_models):
    root = project["root"]
    assert cli(["evaluate", "--params", str(project["params"])]) == 0
    cache = root / "metrics" / "eval_cache"
    entries = {p.name.split("-")[0]: p for p in cache.glob("*.json")}
    assert len(entries) == 2
    # Tamper with the 4K entry: a rerun that reports the tampered number proves it did not re-score.
    four_k = next(p for p in entries.values() if json.loads(p.read_text())["milestone"] == "4K")
    entry = json.loads(four_k.read_text())
    task = project["tasks"][0]
    entry["scores"][task]["value"] = 0.123
    four_k.write_text(json.dumps(entry))
    # New weights under the old name are a new checkpoint: scored again and logged again.
    write_checkpoint(random_model(eval_models["random"].config.vocab_size, seed=7),
                     root / "models" / "pretrain" / "1K", eval_models["tokenizer_dir"], 1024, "1K")
    assert cli(["evaluate", "--params", str(project["params"])]) == 0

    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert metrics["4K"][task] == 0.123
    assert len(list(cache.glob("*.json"))) == 3
    history = _client(project).get_metric_history(project["run_id"], "eval/avg")
    assert sorted(m.step for m in history) == [1024, 1024, 4096]  # 4K was not logged twice


def _only_pretrain_json(root) -> bool:
    return sorted(p.name for p in (root / "metrics").iterdir()) == ["pretrain.json"]


def test_unknown_task_fails_before_anything_is_written(project, capsys):
    params = write_eval_params(project["root"], project["uri"], tasks=[*project["tasks"], "tiny_nope"])
    assert cli(["evaluate", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "eval.tasks: unknown task 'tiny_nope'" in err and len(err.strip().splitlines()) == 1
    assert _only_pretrain_json(project["root"])


def test_checkpoint_without_weights_is_named(project, capsys):
    checkpoint = project["root"] / "models" / "pretrain" / "4K"
    (checkpoint / "model.safetensors").unlink()
    assert cli(["evaluate", "--params", str(project["params"])]) == 2
    assert f"checkpoint {checkpoint}: no weights" in capsys.readouterr().err
    assert _only_pretrain_json(project["root"])


def test_missing_pretrain_run_and_milestones(project, capsys):
    (project["root"] / "metrics" / "pretrain.json").unlink()
    assert cli(["evaluate", "--params", str(project["params"])]) == 2
    assert "pretrain.json: missing" in capsys.readouterr().err
    for checkpoint in (project["root"] / "models" / "pretrain").iterdir():
        for path in checkpoint.iterdir():
            path.unlink()
        checkpoint.rmdir()
    assert cli(["evaluate", "--params", str(project["params"])]) == 2
    assert "no milestone checkpoints" in capsys.readouterr().err


def test_changed_task_rendering_rescores_instead_of_reusing_the_cache(project, monkeypatch):
    """The cache key covers the generated task configs: a fix to how items are rendered must re-score."""
    import tasks.evaluate.lm_eval_tiny as lm_eval_tiny

    root = project["root"]
    assert cli(["evaluate", "--params", str(project["params"])]) == 0
    before = json.loads((root / "metrics" / "eval.json").read_text())
    original = lm_eval_tiny.tiny_task_config

    def without_query(name, items):  # a (bad) new rendering: the choices alone, no question
        return {**original(name, items), "doc_to_text": ""}

    monkeypatch.setattr(lm_eval_tiny, "tiny_task_config", without_query)
    monkeypatch.setattr("tasks.evaluate.tasksets.tiny_task_config", without_query)
    assert cli(["evaluate", "--params", str(project["params"])]) == 0
    after = json.loads((root / "metrics" / "eval.json").read_text())
    assert len(list((root / "metrics" / "eval_cache").glob("*.json"))) == 4, "both milestones scored again"
    assert after["4K"]["avg"] < before["4K"]["avg"], "without the questions the trained model can't answer as well"


def test_scoring_code_is_part_of_the_cache_key(tmp_path):
    """An edit to a scoring module (say, a fix in how requests are built) changes the key, so old scores
    are never reused for new code. Checked on a copy of the package with one edited line."""
    import shutil
    import subprocess
    import sys

    from tasks.evaluate.scoring import SCORING_MODULES, code_fingerprint

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "tasks", copy / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "model", copy / "model", ignore=shutil.ignore_patterns("__pycache__"))
    harness = copy / "tasks" / "evaluate" / SCORING_MODULES[0]
    harness.write_text(harness.read_text() + "\n# a fix\n")
    probe = "from tasks.evaluate.scoring import code_fingerprint; print(code_fingerprint())"
    edited = subprocess.run([sys.executable, "-c", probe], cwd=copy, env={"PYTHONPATH": str(copy)},
                            capture_output=True, text=True, check=True).stdout.strip()
    assert edited and edited != code_fingerprint()
