"""Score one checkpoint (lm-eval tasks + val perplexity), through a cache keyed by what was scored.

The cache lives at `{paths.metrics}/eval_cache/<weights sha256>-<settings>.json`, one file per
entry so concurrent milestone evals never write the same file. The key is the weights hash plus a
fingerprint of everything else that decides a score: the task data, the generated task configs and
eval settings (`TaskSet.fingerprint`), the val rows, and the code that turns items into requests and
scores (`SCORING_MODULES`). So a changed limit, task file or prompt rendering re-scores, while the
`evaluate` stage skips every milestone the Ray evals already scored during training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.errors import UserError
from tasks.evaluate.checkpoints import Checkpoint
from tasks.evaluate.harness import load_checkpoint, run_lm_eval
from tasks.evaluate.perplexity import perplexity, read_manifest, val_rows
from tasks.evaluate.tasksets import TaskSet
from tasks.files import sha256_file, sha256_json, write_json_atomic
from tasks.layout import Layout
from tasks.params import Params

# The code between a checkpoint and its scores; a change to any of these invalidates cached scores.
SCORING_MODULES = ("harness.py", "scoring.py", "perplexity.py", "tasksets.py", "lm_eval_tiny.py",
                   "lm_eval_offline.py", "checkpoints.py")


def code_fingerprint() -> str:
    here = Path(__file__).parent
    return sha256_json({name: sha256_file(here / name) for name in SCORING_MODULES})


def _settings_key(params: Params, taskset: TaskSet) -> str:
    return sha256_json({"tasks": taskset.fingerprint, "code": code_fingerprint(),
                        "val_manifest": read_manifest(Layout.from_params(params).prepared_dir),
                        "perplexity_rows": params.eval.perplexity_rows})[:16]


def cache_path(params: Params, taskset: TaskSet, checkpoint: Checkpoint) -> Path:
    key = f"{checkpoint.weights_sha256}-{_settings_key(params, taskset)}.json"
    return Layout.from_params(params).eval_cache_dir / key


def cached_result(params: Params, taskset: TaskSet, checkpoint: Checkpoint) -> dict | None:
    path = cache_path(params, taskset, checkpoint)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a damaged entry is re-scored, not trusted


def score_checkpoint(params: Params, taskset: TaskSet, checkpoint: Checkpoint) -> dict:
    """{"milestone" (the checkpoint's name), "tokens", "weights_sha256", "scores": {task: TaskScore dict},
    "avg", "val_ppl", "wall_s", "cached"}; stored in the cache before it is returned."""
    cached = cached_result(params, taskset, checkpoint)
    if cached is not None:
        return {**cached, "milestone": checkpoint.name, "tokens": checkpoint.tokens_seen, "cached": True}
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(checkpoint.directory, params.eval.device)
    rows = val_rows(Layout.from_params(params).prepared_dir, params.eval.perplexity_rows)
    if int(rows.max()) >= model.config.vocab_size:
        raise UserError(f"checkpoint {checkpoint.directory}: vocab {model.config.vocab_size} is smaller than the "
                        f"prepared data's token ids (max {int(rows.max())}): tokenizer mismatch")
    scores = run_lm_eval(model, tokenizer, taskset, params.eval)
    ppl = perplexity(model, rows, params.eval.batch_size)
    result = {
        "milestone": checkpoint.name,
        "tokens": checkpoint.tokens_seen,
        "weights_sha256": checkpoint.weights_sha256,
        "scores": {name: score.to_dict() for name, score in scores.items()},
        "avg": sum(score.value for score in scores.values()) / len(scores),
        "val_ppl": ppl,
        "wall_s": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(cache_path(params, taskset, checkpoint), result)
    return {**result, "cached": False}
