"""lm-eval on one of our checkpoints: `simple_evaluate` with `HFLM` around the loaded HF model.

The checkpoint is loaded once (safetensors only) and handed to HFLM as an object, so perplexity and
all tasks share it. BOS is prepended to every request because pretraining puts BOS before each
document (as TinyLlama did); without it the first token is scored out of distribution.
The reported score is `acc_norm` where the task defines it, else `acc` (TinyLlama's EVAL.md columns).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.errors import UserError
from tasks.evaluate.tasksets import TaskSet
from tasks.layout import CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE
from tasks.params import EvalParams

PREFERRED_METRICS = ("acc_norm", "acc")


@dataclass(frozen=True)
class TaskScore:
    metric: str
    value: float
    stderr: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_checkpoint(directory: Path, device: str = "cpu"):
    """(model, tokenizer) from a HF dir written by `model.hf.save_hf`; never unpickles anything."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise UserError(f"checkpoint {directory}: no {CONFIG_FILE} (not a HF checkpoint dir)")
    if not any((directory / name).is_file() for name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE)):
        raise UserError(f"checkpoint {directory}: no weights ({WEIGHTS_FILE} missing)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {directory}: no usable tokenizer files ({exc})".splitlines()[0]) from None
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, use_safetensors=True)
    return model.to(device).eval(), tokenizer


def pick_score(task_results: dict, n: int) -> TaskScore:
    for metric in PREFERRED_METRICS:
        key = f"{metric},none"
        if key in task_results:
            stderr = task_results.get(f"{metric}_stderr,none")
            return TaskScore(metric, float(task_results[key]),
                             float(stderr) if isinstance(stderr, (int, float)) else None, n)
    raise ValueError(f"no acc_norm or acc in lm-eval results: {sorted(task_results)}")


def hf_lm(model, tokenizer, batch_size: int):
    """lm-eval's HFLM around a loaded checkpoint, BOS first on every request: how every score is computed."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=True,
                max_length=model.config.max_position_embeddings)


def run_lm_eval(model, tokenizer, taskset: TaskSet, settings: EvalParams) -> dict[str, TaskScore]:
    """Scores per task, in `taskset.names` order."""
    return score_lm(hf_lm(model, tokenizer, settings.batch_size), taskset, settings)


def _simple_evaluate(lm, taskset: TaskSet, num_fewshot: int, limit: int | None, **options) -> dict:
    """lm-eval's `simple_evaluate` on any lm-eval model object. Its progress bars only on a terminal: it
    passes `disable=False` to tqdm explicitly, which TQDM_DISABLE cannot override, so `disable_tqdm` is set."""
    import functools

    import lm_eval

    from tasks.logs import interactive

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    if not interactive():
        lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
    return lm_eval.simple_evaluate(model=lm, tasks=list(taskset.names), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=taskset.task_manager(), **options)


def _scores(output: dict, taskset: TaskSet) -> dict[str, TaskScore]:
    results, samples = output["results"], output["n-samples"]
    return {name: pick_score(results[name], int(samples[name]["effective"])) for name in taskset.names}


def score_lm(lm, taskset: TaskSet, settings: EvalParams) -> dict[str, TaskScore]:
    """Scores per task of any lm-eval model object (HFLM here, the quantize stage's engines)."""
    output = _simple_evaluate(lm, taskset, settings.num_fewshot, settings.limit, log_samples=False,
                              bootstrap_iters=1000)
    return _scores(output, taskset)


ItemKey = tuple[str, int, int]  # (task, doc_id, request): a request is one choice of a multiple-choice item


def score_items(lm, taskset: TaskSet, num_fewshot: int, limit: int) -> tuple[dict[str, TaskScore],
                                                                               dict[ItemKey, float]]:
    """Scores per task on the first `limit` items of each, and every request's log-likelihood: what two
    ways of scoring the same weights (in process, through a server's API) are compared on."""
    output = _simple_evaluate(lm, taskset, num_fewshot, limit, log_samples=True, bootstrap_iters=0)
    loglikelihoods = {(task, int(sample["doc_id"]), i): float(response[0][0])
                      for task, samples in output["samples"].items() for sample in samples
                      for i, response in enumerate(sample["resps"])}
    return _scores(output, taskset), loglikelihoods
