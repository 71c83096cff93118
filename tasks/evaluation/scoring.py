"""Score one milestone (lm-eval tasks + val perplexity), through a cache keyed by what was scored.

The cache lives at `{paths.metrics}/eval_cache/<weights sha256>-<settings>.json`, one file per
entry so concurrent milestone evals never write the same file. The key is the weights hash plus a
fingerprint of the task data and eval settings, so a changed limit or task file re-scores, while the
`evaluate` stage skips every milestone the Ray evals already scored during training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.errors import UserError
from tasks.files import sha256_json, write_json_atomic
from tasks.evaluation.harness import load_checkpoint, run_lm_eval
from tasks.evaluation.milestones import Milestone
from tasks.evaluation.perplexity import perplexity, read_manifest, val_rows
from tasks.evaluation.tasksets import TaskSet
from tasks.params import Params

CACHE_DIR = "eval_cache"


def _settings_key(params: Params, taskset: TaskSet) -> str:
    prepared = Path(params.paths.data) / "prepared"
    return sha256_json({"tasks": taskset.fingerprint, "val_manifest": read_manifest(prepared),
                        "perplexity_rows": params.eval.perplexity_rows})[:16]


def cache_path(params: Params, taskset: TaskSet, milestone: Milestone) -> Path:
    return Path(params.paths.metrics) / CACHE_DIR / f"{milestone.weights_sha256}-{_settings_key(params, taskset)}.json"


def cached_result(params: Params, taskset: TaskSet, milestone: Milestone) -> dict | None:
    path = cache_path(params, taskset, milestone)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a damaged entry is re-scored, not trusted


def score_milestone(params: Params, taskset: TaskSet, milestone: Milestone) -> dict:
    """{"milestone", "tokens", "weights_sha256", "scores": {task: TaskScore dict}, "avg", "val_ppl",
    "wall_s", "cached"}; stored in the cache before it is returned."""
    cached = cached_result(params, taskset, milestone)
    if cached is not None:
        return {**cached, "cached": True}
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(milestone.directory, params.eval.device)
    rows = val_rows(Path(params.paths.data) / "prepared", params.eval.perplexity_rows)
    if int(rows.max()) >= model.config.vocab_size:
        raise UserError(f"checkpoint {milestone.directory}: vocab {model.config.vocab_size} is smaller than the "
                        f"prepared data's token ids (max {int(rows.max())}): tokenizer mismatch")
    scores = run_lm_eval(model, tokenizer, taskset, params.eval)
    ppl = perplexity(model, rows, params.eval.batch_size)
    result = {
        "milestone": milestone.name,
        "tokens": milestone.tokens_seen,
        "weights_sha256": milestone.weights_sha256,
        "scores": {name: score.to_dict() for name, score in scores.items()},
        "avg": sum(score.value for score in scores.values()) / len(scores),
        "val_ppl": ppl,
        "wall_s": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(cache_path(params, taskset, milestone), result)
    return {**result, "cached": False}
