"""dvc.yaml as the DAG: its structure (fast) and what DVC does with it on the real tiny pipeline (slow).

The slow tests share one `dvc repro` of a clean copy of the repo (the `pipeline_repo` fixture in
conftest.py) and make their own copies of it before changing anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import pytest
import yaml

from flows.dag import load_stages
from imports import imported_project_files, is_package_marker
from pipeline_repo import clone_workspace, dvc, fresh_copy, git, run_repro
from tasks.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]

# Modules a stage imports that are deliberately not DVC deps, each with the reason. Changing them
# must not rerun weeks of training: they decide where and how results are reported, not what is computed.
NOT_DEPS = {
    "tasks/cli.py": "the dispatcher: a new subcommand must not rerun every stage",
    "tasks/errors.py": "the error type only",
    "tasks/params.py": "the schema; the values each stage reads are DVC params",
    "tasks/tracking.py": "where MLflow runs go, not what a stage computes",
    "tasks/layout.py": "where files go (each stage's outputs are DVC outs themselves): a new stage's path must "
                       "not rerun every stage",
    "model/files.py": "file names only, re-exported by tasks/layout.py",
    "tasks/files.py": "how a file is written (atomically) or hashed, not what it holds",
}
# pretrain scores milestones as they land (advisory, into MLflow); the evaluate stage is what
# guarantees and records every score, so eval code and params rerun evaluate only.
NOT_DEPS_BY_STAGE = {"pretrain": ("tasks/evaluate/",)}


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _counted(file: str) -> bool:
    return file not in NOT_DEPS and not is_package_marker(ROOT / file)


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


def _param_keys(stage: dict) -> list[str]:
    keys = []
    for entry in stage.get("params", []):
        keys += list(entry.values())[0] if isinstance(entry, dict) else [entry]
    return keys


def _has_key(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


STAGES = list(_dvc_yaml()["stages"])


def test_today_stages_in_order():
    assert [s.name for s in load_stages(ROOT)][:4] == ["tokenizer", "prepare", "pretrain", "evaluate"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_cmd_is_the_cli_subcommand_on_params_yaml(stage):
    cmd = _dvc_yaml()["stages"][stage]["cmd"]
    assert cmd == f".venv/bin/tinyllama {stage} --params params.yaml"
    assert stage in COMMANDS
    assert importlib.util.find_spec(COMMANDS[stage][0]) is not None, f"{COMMANDS[stage][0]} does not exist yet"


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml"))])
def test_every_stage_param_exists_in_every_profile(profile):
    """DVC stops with 'missing params' when a listed key is absent, so each profile must carry them all."""
    tree = yaml.safe_load((ROOT / profile).read_text())
    missing = [f"{stage}: {key}" for stage, spec in _dvc_yaml()["stages"].items()
               for key in _param_keys(spec) if not _has_key(tree, key)]
    assert not missing, f"{profile} lacks keys dvc.yaml tracks: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_deps_cover_the_code_the_stage_imports(stage):
    """A code change must rerun every stage that runs that code, and nothing else."""
    spec = _dvc_yaml()["stages"][stage]
    deps = [d for d in spec.get("deps", []) if "${" not in d]
    exempt = NOT_DEPS_BY_STAGE.get(stage, ())
    imported = imported_project_files(COMMANDS[stage][0], skip=lambda relative: relative in NOT_DEPS)
    assert len(imported) > 1, f"found no code behind {COMMANDS[stage][0]}"
    uncovered = sorted(f for f in imported
                       if _counted(f) and not _covered(f, deps) and not any(f.startswith(e) for e in exempt))
    assert not uncovered, f"stage {stage} imports files that are not in its deps: {uncovered}"
    unused = [d for d in deps if not any(_covered(f, [d]) for f in imported)]
    assert not unused, f"stage {stage} lists code deps it never imports: {unused}"


def test_outputs_metrics_and_upstream_links():
    stages = {s.name: s for s in load_stages(ROOT)}
    assert stages["prepare"].upstream == ("tokenizer",)
    assert set(stages["pretrain"].upstream) == {"tokenizer", "prepare"}
    assert "pretrain" in stages["evaluate"].upstream
    assert stages["pretrain"].metrics == ("metrics/pretrain.json",)
    assert stages["evaluate"].metrics == ("metrics/eval.json",)
    raw = _dvc_yaml()["stages"]
    for name in ("pretrain", "evaluate"):
        for entry in raw[name]["metrics"]:
            assert list(entry.values())[0] == {"cache": False}, "metrics live in git, not the DVC cache"


# ---------------------------------------------------------------- slow: the real tiny pipeline


@pytest.mark.slow
def test_repro_on_a_fresh_copy_runs_every_stage(pipeline_repo):
    root = pipeline_repo.root
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) >= {"tokenizer", "prepare", "pretrain", "evaluate"}
    for stage in load_stages(root):
        for out in stage.outs:
            assert (root / out).exists(), f"{stage.name} did not write {out}"
    status = json.loads(dvc(root, "status", "--json").stdout)
    assert status == {}, f"dvc status not clean after repro: {status}"


@pytest.mark.slow
def test_second_repro_is_a_noop_in_seconds(pipeline_repo):
    start = time.monotonic()
    out = run_repro(pipeline_repo.root)
    seconds = time.monotonic() - start
    assert "Running stage" not in out.stdout, out.stdout
    assert seconds < 60, f"a no-op repro took {seconds:.1f} s"


@pytest.mark.slow
def test_metrics_show_has_pretrain_and_eval_numbers(pipeline_repo):
    shown = json.loads(dvc(pipeline_repo.root, "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]
    pretrain = metrics["metrics/pretrain.json"]["data"]
    evaluation = metrics["metrics/eval.json"]["data"]
    assert isinstance(pretrain["final_train_loss"], float) and pretrain["tokens"] > 0
    milestones = [m for m in evaluation.values() if isinstance(m, dict)]
    assert milestones and all(0.0 <= m["avg"] <= 1.0 for m in milestones)


@pytest.mark.slow
def test_exp_run_with_a_changed_train_param_reruns_only_pretrain_and_downstream(pipeline_repo, tmp_path):
    """`dvc exp run -S`: a shorter pretrain reruns pretrain and evaluate; tokenizer and prepare stay cached.
    (Up to evaluate: the chat variants name milestones this shorter run does not reach.)"""
    root = clone_workspace(pipeline_repo.root, tmp_path / "exp")
    out = dvc(root, "exp", "run", "-n", "short", "-S", "train.total_tokens=250K", "-S", "train.milestones=[100K,250K]",
              "evaluate")
    assert "Running stage 'pretrain'" in out.stdout and "Running stage 'evaluate'" in out.stdout, out.stdout
    assert "Running stage 'tokenizer'" not in out.stdout and "Running stage 'prepare'" not in out.stdout
    evaluated = json.loads((root / "metrics" / "eval.json").read_text())
    assert sorted(k for k, v in evaluated.items() if isinstance(v, dict)) == ["100K", "250K"]
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    assert "short" in json.dumps(shown)


@pytest.mark.slow
def test_changed_eval_param_reruns_only_evaluate(pipeline_repo, tmp_path):
    root = clone_workspace(pipeline_repo.root, tmp_path / "eval-change")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["eval"]["batch_size"] = params["eval"]["batch_size"] // 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run_repro(root)
    ran = [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["evaluate"], out.stdout


@pytest.mark.slow
def test_two_clean_runs_give_identical_data_and_weights(pipeline_repo, tmp_path):
    """Same seed, CPU: a second clean copy rebuilds byte-identical prepared data and milestone weights."""
    second = fresh_copy(tmp_path / "second")

    def source_tree(root: Path) -> str:
        first_commit = git(root, "rev-list", "--max-parents=0", "HEAD").stdout.split()[0]
        return git(root, "rev-parse", f"{first_commit}^{{tree}}").stdout.strip()

    assert source_tree(second) == source_tree(pipeline_repo.root), "the two runs must start from the same sources"
    run_repro(second, "pretrain")

    def out_hash(root: Path, stage: str, path: str) -> str:
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)

    for stage, path in (("tokenizer", "models/tokenizer"), ("prepare", "data/prepared"), ("prepare", "data/eval")):
        assert out_hash(second, stage, path) == out_hash(pipeline_repo.root, stage, path), path
    first_weights = sorted((pipeline_repo.root / "models" / "pretrain").glob("*/model.safetensors"))
    assert first_weights
    for weights in first_weights:
        twin = second / weights.relative_to(pipeline_repo.root)
        assert hashlib.sha256(twin.read_bytes()).hexdigest() == hashlib.sha256(weights.read_bytes()).hexdigest(), weights
