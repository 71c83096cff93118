"""Score one checkpoint (lm-eval tasks + val perplexity), through a cache keyed by what was scored.

What scoring needs besides the weights is gathered once, by the driver, into `EvalInputs` (the tasks'
rows, the val rows, the cache's location): a milestone eval running as a Ray task on another node
gets it in memory and reads no file of the driver's. The cache lives at `{eval cache}/<weights
sha256>-<settings>.json` (`{paths.metrics}/eval_cache`, or `{paths.shared}/eval_cache` on a cluster),
one file per entry so concurrent milestone evals never write the same file. The key is the weights hash
plus a fingerprint of everything else that decides a score: the task data, the generated task configs
and eval settings (`TaskBundle.fingerprint`), the val rows, and the code that turns items into requests
and scores (`SCORING_MODULES`). So a changed limit, task file or prompt rendering re-scores, while the
`evaluate` stage skips every milestone the Ray evals already scored during training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.errors import UserError
from tasks.evaluate.checkpoints import Checkpoint
from tasks.evaluate.harness import load_checkpoint, run_lm_eval
from tasks.evaluate.perplexity import perplexity, val_rows
from tasks.evaluate.tasksets import TaskBundle, TaskSet, collect_tasks
from tasks.files import exists, read_json, sha256_bytes, sha256_file, sha256_json, write_json_atomic
from tasks.layout import Layout, join
from tasks.params import Params

# The code between a checkpoint and its scores; a change to any of these invalidates cached scores.
SCORING_MODULES = ("harness.py", "scoring.py", "perplexity.py", "tasksets.py", "lm_eval_tiny.py",
                   "lm_eval_offline.py", "checkpoints.py")


def code_fingerprint() -> str:
    here = Path(__file__).parent
    return sha256_json({name: sha256_file(here / name) for name in SCORING_MODULES})


@dataclass(frozen=True)
class EvalInputs:
    """Everything scoring reads besides the checkpoint, in memory (see the module docstring)."""

    tasks: TaskBundle
    val_rows: np.ndarray      # (n, seq_len + 1) ids of the prepared val split
    cache_dir: str            # a local path or a URI

    @property
    def key(self) -> str:
        return sha256_json({"tasks": self.tasks.fingerprint, "code": code_fingerprint(),
                            "val_rows": sha256_bytes(np.ascontiguousarray(self.val_rows).tobytes())})[:16]


def collect_inputs(params: Params) -> EvalInputs:
    layout = Layout.from_params(params)
    return EvalInputs(tasks=collect_tasks(params), val_rows=val_rows(layout.prepared_dir, params.eval.perplexity_rows),
                      cache_dir=layout.eval_cache)


def cache_path(inputs: EvalInputs, weights_sha256: str) -> str:
    return join(inputs.cache_dir, f"{weights_sha256}-{inputs.key}.json")


def cached_result(inputs: EvalInputs, weights_sha256: str, name: str, tokens: int) -> dict | None:
    """What `score_checkpoint` returns (`cached`: true) for the weights with this sha256
    (`Checkpoint.weights_sha256`) when the cache holds their scores, else None."""
    path = cache_path(inputs, weights_sha256)
    if not exists(path):
        return None
    try:
        cached = read_json(path)
    except UserError:
        return None  # a damaged entry is re-scored, not trusted
    return {**cached, "milestone": name, "tokens": tokens, "cached": True}


def score_checkpoint(params: Params, inputs: EvalInputs, taskset: TaskSet, checkpoint: Checkpoint) -> dict:
    """{"milestone" (the checkpoint's name), "tokens", "weights_sha256", "scores": {task: TaskScore dict},
    "avg", "val_ppl", "wall_s", "cached"}; stored in the cache before it is returned. `taskset` is
    `inputs.tasks` written out (`TaskBundle.write`)."""
    cached = cached_result(inputs, checkpoint.weights_sha256, checkpoint.name, checkpoint.tokens_seen)
    if cached is not None:
        return cached
    start = time.perf_counter()
    model, tokenizer = load_checkpoint(checkpoint.directory, params.eval.device)
    rows = inputs.val_rows
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
    write_json_atomic(cache_path(inputs, checkpoint.weights_sha256), result)
    return {**result, "cached": False}
