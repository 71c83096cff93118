"""Do milestone evals slow training? The tiny profile's pretrain run twice in the same session, with
`train.eval_milestones_during_training` off and on, on the same prepared data. Target (issue 5):
training steps that overlap an eval run at ≥ 90% of the same steps without evals.

  .venv/bin/python benchmarks/eval_overlap.py            # tokenizer + prepare once, then pretrain off / on
  .venv/bin/python benchmarks/eval_overlap.py --keep DIR # keep the project dir (eval tables, MLflow store)

How it measures: pretrain logs `tokens_per_s` per step to MLflow with the wall-clock time of the step;
each milestone eval logs `eval/wall_s` when it finishes, so its window is [finish - wall_s, finish].
Steps of the evals-on run that fall in a window are compared with the *same step numbers* of the
evals-off run (medians). Steps outside any window are compared too: that ratio is the noise floor
of the shared machine, and the overlap ratio is only meaningful next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cli(stage: str, root: Path, params: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tasks.cli", stage, "--params", params], cwd=root, check=True,
                   env={k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")})
    return time.perf_counter() - start


def _variant(root: Path, name: str, evals: bool) -> str:
    """params for one pretrain run: own models/metrics/checkpoints, shared data and tokenizer."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["paths"].update(models=f"{name}/models", metrics=f"{name}/metrics")
    raw["train"].update(eval_milestones_during_training=evals, checkpoint_dir=f"{name}/checkpoints")
    (root / name / "models").mkdir(parents=True)
    shutil.copytree(root / "models" / "tokenizer", root / name / "models" / "tokenizer")
    (root / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return f"{name}.yaml"


def _history(root: Path, name: str, key: str):
    from mlflow import MlflowClient

    run_id = json.loads((root / name / "metrics" / "pretrain.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{(root / 'mlflow' / 'mlflow.db').resolve()}")
    return client.get_metric_history(run_id, key)


def measure(root: Path) -> dict:
    off = {m.step: m.value for m in _history(root, "off", "tokens_per_s")}
    on_steps = _history(root, "on", "tokens_per_s")
    windows = [(m.timestamp - 1000 * m.value, m.timestamp) for m in _history(root, "on", "eval/wall_s")]
    inside, outside = [], []
    for m in on_steps:
        if m.step in off and m.step > 1:
            overlapped = any(a <= m.timestamp <= b for a, b in windows)
            (inside if overlapped else outside).append((m.value, off[m.step]))

    def ratio(pairs):
        return (round(statistics.median(v for v, _ in pairs) / statistics.median(v for _, v in pairs), 3) if pairs
                else None)

    metrics = {name: json.loads((root / name / "metrics" / "pretrain.json").read_text()) for name in ("off", "on")}
    return {"overlap_steps": len(inside), "other_steps": len(outside),
            "overlap_ratio_on_over_off": ratio(inside), "noise_ratio_outside_evals": ratio(outside),
            "session_tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in metrics.items()},
            "eval_windows_s": [round((b - a) / 1000, 1) for a, b in windows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in (and keep) this dir instead of a temp dir")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-evals-"))
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    try:
        timings = {stage: round(_cli(stage, root, "params.yaml"), 1) for stage in ("tokenizer", "prepare")}
        for name, evals in (("off", False), ("on", True)):
            timings[f"pretrain_{name}"] = round(_cli("pretrain", root, _variant(root, name, evals)), 1)
        result = {"wall_s": timings, **measure(root)}
        print(json.dumps(result, indent=2))
        out = ROOT / "benchmarks" / "results" / "eval_overlap.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
