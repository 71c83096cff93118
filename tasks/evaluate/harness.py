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


def run_lm_eval(model, tokenizer, taskset: TaskSet, settings: EvalParams) -> dict[str, TaskScore]:
    """Scores per task, in `taskset.names` order."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, add_bos_token=True,
              max_length=model.config.max_position_embeddings)
    return score_lm(lm, taskset, settings)


def score_lm(lm, taskset: TaskSet, settings: EvalParams) -> dict[str, TaskScore]:
    """Scores per task of any lm-eval model object (HFLM here, the quantize stage's engines). lm-eval's
    progress bars only on a terminal: it passes `disable=False` to tqdm explicitly, which TQDM_DISABLE
    cannot override, so its `disable_tqdm` is set instead."""
    import functools

    import lm_eval

    from tasks.logs import interactive

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    if not interactive():
        lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
    output = lm_eval.simple_evaluate(model=lm, tasks=list(taskset.names), num_fewshot=settings.num_fewshot,
                                     limit=settings.limit, task_manager=taskset.task_manager(),
                                     log_samples=False, bootstrap_iters=1000)
    results, samples = output["results"], output["n-samples"]
    return {name: pick_score(results[name], int(samples[name]["effective"])) for name in taskset.names}
