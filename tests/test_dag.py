"""dvc.yaml as the DAG: its structure (fast) and what DVC does with it on the real tiny pipeline (slow).

The slow tests share one `dvc repro` of a clean copy of the repo (the `pipeline_repo` fixture in
conftest.py) and make their own copies of it before changing anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from imports import imported_project_files, is_package_marker
from pipeline_repo import clone_workspace, dvc, fresh_copy, run_repro

from flows.dag import load_stages
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
    "tasks/logs.py": "where a stage's output goes (console, log file), not what it computes",
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


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(p.relative_to(ROOT).as_posix()
                                                            for p in (ROOT / "configs").glob("*.yaml"))])
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
def test_second_repro_is_a_noop(pipeline_repo):
    """Nothing reruns and nothing is rewritten: every output's DVC hash, dvc.lock and the metrics stay as they were
    (what "a no-op" means; its wall time depends on the machine, so it is not what this test asserts)."""
    root = pipeline_repo.root
    lock = (root / "dvc.lock").read_bytes()
    metrics = {p.name: p.stat().st_mtime_ns for p in (root / "metrics").iterdir()}
    out = run_repro(root)
    assert "Running stage" not in out.stdout, out.stdout
    assert (root / "dvc.lock").read_bytes() == lock
    assert {p.name: p.stat().st_mtime_ns for p in (root / "metrics").iterdir()} == metrics
@pytest.mark.slow
def test_metrics_show_has_pretrain_and_eval_numbers(pipeline_repo):
    shown = json.loads(dvc(pipeline_repo.root, "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]
    pretrain = metrics["metrics/pretrain.json"]["data"]
    evaluation = metrics["metrics/eval.json"]["data"]
    assert isinstance(pretrain["final_train_loss"], float) and pretrain["tokens"] > 0
    milestones = [m for m in evaluation.values() if isinstance(m, dict)]
    tasks = yaml.safe_load((pipeline_repo.root / "params.yaml").read_text())["eval"]["tasks"]
    assert len(milestones) == len(yaml.safe_load((pipeline_repo.root / "params.yaml").read_text())["train"]
                                  ["milestones"])
    for m in milestones:  # the average DVC shows is the average of the task scores it shows
        assert m["avg"] == pytest.approx(sum(m[t] for t in tasks) / len(tasks))
    assert [m["tokens"] for m in milestones] == sorted(m["tokens"] for m in milestones)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_exp_run_with_a_changed_train_param_reruns_only_pretrain_and_downstream(pipeline_repo, tmp_path):
    """`dvc exp run -S`: a shorter pretrain (4 steps, no evals during training) reruns pretrain and evaluate;
    tokenizer and prepare stay cached. (Up to evaluate: the chat variants name milestones this run lacks.)
    The changed train params are what matters, not their size: the cheapest run that has two milestones."""
    root = clone_workspace(pipeline_repo.root, tmp_path / "exp", mlflow=False)
    out = dvc(root, "exp", "run", "-n", "short", "-S", "train.total_tokens=16K", "-S", "train.milestones=[8K,16K]",
              "-S", "train.warmup_steps=2", "-S", "train.eval_milestones_during_training=false", "evaluate")
    ran = [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["pretrain", "evaluate"], out.stdout
    evaluated = json.loads((root / "metrics" / "eval.json").read_text())
    assert sorted(k for k, v in evaluated.items() if isinstance(v, dict)) == ["16K", "8K"]
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    assert "short" in json.dumps(shown)


def _micro_profile(root: Path) -> None:
    """The tiny profile shrunk to what still exercises every stage: a smaller corpus, vocab 512, the
    micro model, 32 steps of 1,024 tokens, four milestones, no evals during training."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["tokenizer"]["vocab_size"] = 512
    raw["model"]["preset"] = "micro"
    raw["data"].update(seq_len=64, builtin={"seed": 1234, "entities": 6, "programs": 200})
    raw["train"].update(micro_batch=4, global_batch_tokens=1024, total_tokens="32K",
                        milestones=["4K", "8K", "16K", "32K"],
                        warmup_steps=3, checkpoint_every_steps=4, val_every_steps=8, log_every_steps=8,
                        eval_milestones_during_training=False)
    for variant, base in zip(raw["sft"]["variants"], ("32K", "16K")):
        variant.update(base=base, max_length=64)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _sealed(root: Path, milestone: str) -> bool:
    return any(root.glob(f"checkpoints/pretrain/run-*/milestones/{milestone}/milestone.json"))


def _resume_checkpoints(root: Path) -> list[Path]:
    """The complete resume checkpoints of the copy's run, oldest first."""
    return sorted(p for p in root.glob("checkpoints/pretrain/run-*/checkpoint_*") if (p / "checkpoint.json").is_file())


def _kill_the_machine_once_sealed(root: Path, milestone: str) -> None:
    """Starts `dvc repro pretrain` in `root` and, once `milestone` is sealed, SIGKILLs its whole process group and
    every Ray daemon and worker it started, as a machine's death would."""
    import contextlib
    import os
    import signal
    import subprocess

    import psutil
    from pipeline_repo import env_for

    killed = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "pretrain"], cwd=root, env=env_for(root),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not _sealed(root, milestone) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert killed.poll() is None and not _sealed(root, "32K"), "the run ended before it could be killed"
    processes = [psutil.Process(killed.pid), *psutil.Process(killed.pid).children(recursive=True)]
    os.killpg(killed.pid, signal.SIGKILL)
    for process in processes:  # Ray's daemons and workers too, or they would go on writing checkpoints
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    killed.wait()
    psutil.wait_procs(processes, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_killed_pretrain_rerun_by_dvc_repro_matches_an_uninterrupted_run(tmp_path):
    """Two clean copies, same seed, CPU, run side by side. The first runs to the end. The second's `dvc repro` is killed
    (SIGKILL, the whole process group: the machine "dies") once its second milestone is out, and its newest
    resume checkpoint is then cut short (a write the crash interrupted). `dvc repro` runs again: DVC deletes
    the stage's outputs first, pretraining sets the corrupt checkpoint aside and resumes from the one before,
    and every milestone must be there, byte-identical to the first copy's, as must the tokenizer and the
    prepared data."""
    import os
    import signal
    import subprocess

    from pipeline_repo import env_for

    first, second = fresh_copy(tmp_path / "first"), fresh_copy(tmp_path / "second")
    for root in (first, second):
        _micro_profile(root)
    # The uninterrupted run goes on beside the killed one (two local Rays): most of each run is start-up waits.
    reference_log = tmp_path / "uninterrupted.log"
    with reference_log.open("wb") as log:
        uninterrupted = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "pretrain"], cwd=first,
                                         env=env_for(first), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
    try:
        _kill_the_machine_once_sealed(second, "8K")
        saved = _resume_checkpoints(second)
        assert len(saved) >= 2, saved
        previous, newest = saved[-2:]
        cut_short = newest / "model.safetensors"
        cut_short.write_bytes(cut_short.read_bytes()[: cut_short.stat().st_size // 2])
        rerun = run_repro(second, "pretrain")
        assert uninterrupted.wait(timeout=600) == 0, reference_log.read_text()[-3000:]
    finally:
        if uninterrupted.poll() is None:
            os.killpg(uninterrupted.pid, signal.SIGKILL)
    output = rerun.stdout + rerun.stderr
    assert f"resume checkpoint {newest.name} is corrupt" in output, output[-3000:]
    assert f"resuming from {previous.name}" in output, output[-3000:]
    assert (newest.parent / f"corrupt-{newest.name}").is_dir()

    def out_hash(root: Path, stage: str, path: str) -> str:
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)

    for stage, path in (("tokenizer", "models/tokenizer"), ("prepare", "data/prepared"), ("prepare", "data/eval"),
                        ("pretrain", "models/pretrain")):
        assert out_hash(second, stage, path) == out_hash(first, stage, path), path
    weights = sorted((first / "models" / "pretrain").glob("*/model.safetensors"))
    assert sorted(w.parent.name for w in weights) == ["16K", "32K", "4K", "8K"]
    for file in weights:
        twin = second / file.relative_to(first)
        assert hashlib.sha256(twin.read_bytes()).hexdigest() == hashlib.sha256(file.read_bytes()).hexdigest(), file
