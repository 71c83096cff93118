"""Learning is visible: the real tiny pipeline (tokenizer -> prepare -> pretrain -> evaluate, through
the CLI a user runs, in a copy of the repo's params.yaml) must lift the last milestone's average at
least 10 points above the first milestone's and 10 points above chance. It also reports what the
milestone evals cost: wall time per milestone and their share of the whole pipeline's time.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from eval_fixtures import ROOT

STAGES = ("tokenizer", "prepare", "pretrain", "evaluate")


@pytest.mark.slow
def test_tiny_pipeline_scores_rise_above_chance(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    stage_s = {}
    for stage in STAGES:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tasks.cli", stage, "--params", "params.yaml"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=3600)
        stage_s[stage] = time.perf_counter() - start
        assert done.returncode == 0, f"{stage} failed:\n{done.stderr[-4000:]}"

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    registry = json.loads((tmp_path / "data" / "eval" / "tasks.json").read_text())
    tasks = params["eval"]["tasks"]
    chance = sum(registry[t]["chance"] for t in tasks) / len(tasks)
    scores = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    milestones = list(scores)
    assert len(milestones) == len(params["train"]["milestones"])
    first, last = scores[milestones[0]], scores[milestones[-1]]
    assert last["val_ppl"] < first["val_ppl"]

    entries = [json.loads(p.read_text()) for p in (tmp_path / "metrics" / "eval_cache").glob("*.json")]
    eval_s = {e["milestone"]: e["wall_s"] for e in entries}
    total_s = sum(stage_s.values())
    print("\nstage wall s:", {k: round(v, 1) for k, v in stage_s.items()}, f"total {total_s:.1f}")
    print("eval wall s per milestone:", eval_s, f"sum {sum(eval_s.values()):.1f} "
          f"= {100 * sum(eval_s.values()) / total_s:.1f}% of the pipeline")
    print("avg by milestone:", {m: round(100 * s["avg"], 2) for m, s in scores.items()},
          f"chance {100 * chance:.2f}")
    assert last["avg"] >= first["avg"] + 0.10
    assert last["avg"] >= chance + 0.10
