"""Learning is visible: on the real tiny pipeline (the shared `pipeline_repo` run: tokenizer → prepare →
pretrain → evaluate through `dvc repro` on a clean copy of the repo) the last milestone's average must
be at least 10 points above the first milestone's and 10 points above chance. It also reports what the
milestone evals cost: wall time per milestone and their share of the whole pipeline's time.
"""

import json

import pytest
import yaml


@pytest.mark.slow
def test_tiny_pipeline_scores_rise_above_chance(pipeline_repo):
    root = pipeline_repo.root
    params = yaml.safe_load((root / "params.yaml").read_text())
    registry = json.loads((root / "data" / "eval" / "tasks.json").read_text())
    tasks = params["eval"]["tasks"]
    chance = sum(registry[t]["chance"] for t in tasks) / len(tasks)
    scores = json.loads((root / "metrics" / "eval.json").read_text())
    milestones = [m for m, v in scores.items() if isinstance(v, dict)]
    assert len(milestones) == len(params["train"]["milestones"])
    first, last = scores[milestones[0]], scores[milestones[-1]]
    assert last["val_ppl"] < first["val_ppl"]

    entries = [json.loads(p.read_text()) for p in (root / "metrics" / "eval_cache").glob("*.json")]
    eval_s = {e["milestone"]: e["wall_s"] for e in entries}
    if pipeline_repo.total_seconds:
        print("\nstage wall s:", pipeline_repo.stage_seconds, f"total {pipeline_repo.total_seconds}")
        print("eval wall s per milestone:", eval_s, f"sum {sum(eval_s.values()):.1f} "
              f"= {100 * sum(eval_s.values()) / pipeline_repo.total_seconds:.1f}% of the pipeline")
    print("avg by milestone:", {m: round(100 * scores[m]["avg"], 2) for m in milestones}, f"chance {100 * chance:.2f}")
    assert last["avg"] >= first["avg"] + 0.10
    assert last["avg"] >= chance + 0.10
