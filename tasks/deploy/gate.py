"""The deploy gate: what is served is what was evaluated.

lm-eval itself, pointed at the running app as `local-completions` (token-id prompts with `echo` and
`logprobs`, the served model's own tokenizer, BOS first as our scoring adds it), scores the first
`deploy.gate.items` items of every `eval.tasks` task; in-process scoring of the same weights (HFLM,
tasks/evaluate/harness.py, the code every recorded score came from) scores the same items. Every
request's log-likelihood must agree within `deploy.gate.tolerance`, and so must the task scores on
those items. A bf16/fp16 replica (the GPU profile's) is compared with the same fp32 reference, allowed the
rounding its dtype causes, measured in process on the same requests (`run_gate`). The score the alignment
stage (or the evaluate stage) recorded for the served model covers all items, so it is put beside them for
the reader, not compared.

lm-eval's client runs in the calling process (the stage's), never on the server's event loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.deploy.check import CheckFailed
from tasks.evaluate.harness import ItemKey, TaskScore, hf_lm, load_checkpoint, score_items
from tasks.evaluate.tasksets import TaskSet
from tasks.files import read_json
from tasks.layout import Layout
from tasks.params import Params


class GateFailed(CheckFailed):
    """The served model scores differently from the weights the pipeline evaluated."""


@dataclass(frozen=True)
class Comparison:
    """Per-request log-likelihoods of the served model against in-process scoring."""

    compared: int                 # requests scored both ways
    worst: ItemKey | None         # the request with the largest difference
    max_abs_diff: float           # inf when a value is missing or not a number
    missing: tuple[ItemKey, ...]  # requests only one side scored
    tolerance: float

    @property
    def passed(self) -> bool:
        return not self.missing and self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        if self.missing:
            return f"{len(self.missing)} requests scored only one way, first {item_name(self.missing[0])}"
        worst = item_name(self.worst) if self.worst else "none"
        return (f"largest log-likelihood difference {self.max_abs_diff:.2e} (tolerance {self.tolerance:g}) "
                f"over {self.compared} requests, at {worst}")


def item_name(key: ItemKey) -> str:
    task, doc, request = key
    return f"{task} item {doc} choice {request}"


def compare(served: dict[ItemKey, float], reference: dict[ItemKey, float], tolerance: float) -> Comparison:
    """Pure: the largest |served - reference| over the requests both scored (NaN counts as infinite)."""
    missing = tuple(sorted(set(served) ^ set(reference)))
    worst, largest = None, 0.0
    for key in sorted(set(served) & set(reference)):
        diff = abs(served[key] - reference[key])
        diff = math.inf if math.isnan(diff) else diff
        if worst is None or diff > largest:
            worst, largest = key, diff
    return Comparison(compared=len(set(served) & set(reference)), worst=worst,
                      max_abs_diff=math.inf if missing else largest, missing=missing, tolerance=tolerance)


def served_lm(base_url: str, api_key: str | None, model: str, tokenizer_dir: Path, max_length: int,
              batch_size: int):
    """lm-eval's `local-completions` client for the app at `base_url` (…/v1)."""
    from lm_eval.api.registry import get_model

    header = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return get_model("local-completions")(
        model=model, base_url=f"{base_url}/completions", tokenizer=str(tokenizer_dir),
        tokenizer_backend="huggingface", add_bos_token=True, max_length=max_length, batch_size=batch_size,
        header=header)


def recorded_average(params: Params, lineage: dict) -> dict | None:
    """The lm-eval average the pipeline recorded for this model on all items: the alignment stage's (its
    registry tags name the stage and variant), or the evaluate stage's for a pretrain milestone."""
    layout = Layout.from_params(params)
    stage, variant = lineage.get("tag.stage"), lineage.get("tag.variant")
    if stage and variant:
        path, keys = layout.metrics_file(stage), (variant, stage)
    else:
        path, keys = layout.metrics_file("eval"), (Path(lineage.get("model_dir", "")).name,)
    record = read_json(path) if path.is_file() else {}
    for key in keys:
        record = record.get(key, {}) if isinstance(record, dict) else {}
    return {"avg": record["avg"], "from": f"{path.name} {'.'.join(keys)}.avg"} if "avg" in record else None


def _accuracies(scores: dict[str, TaskScore]) -> dict[str, float]:
    return {name: score.value for name, score in scores.items()}


# How much further than the in-process rounding noise a bf16/fp16 replica may be from fp32: its kernels round in
# another order than HF's, so its deviation is of the same size, not the same values (the noise is a maximum
# over every request; a model that is not the scored one is off by whole nats).
NOISE_FACTOR = 2.0


def rounding_noise(model, tokenizer, params: Params, taskset: TaskSet, reference: dict[ItemKey, float]) -> float:
    """The largest |log-likelihood in the served dtype - fp32| over the gate's requests, both in process: how far
    a bf16 or fp16 replica's scores may move from the evaluated (fp32) ones by rounding alone (0 for fp32).
    The weights and activations in that dtype, the logits read out in fp32 as a replica does (lm-eval would
    otherwise take the log-softmax in bf16, whose 8-bit mantissa alone moves a log-probability of -6 by 0.03).
    Converts `model` in place (no second copy on the device): the caller is done with its fp32 scores."""
    from model.devices import check_dtype

    if params.deploy.dtype == "fp32":
        return 0.0
    model = model.to(check_dtype(params.deploy.dtype, "deploy.dtype"))
    model.get_output_embeddings().register_forward_hook(lambda _module, _inputs, logits: logits.float())
    _, rounded = score_items(hf_lm(model, tokenizer, params.eval.batch_size), taskset, params.eval.num_fewshot,
                             params.deploy.gate.items)
    return compare(rounded, reference, math.inf).max_abs_diff


def run_gate(params: Params, taskset: TaskSet, base_url: str, api_key: str | None, model_name: str,
             model_dir: Path, lineage: dict) -> dict:
    """Score the served model through its API (tokenized with `model_dir`'s tokenizer) and the weights in
    `model_dir` in process, on the same items; the result for metrics/serve.json ("passed" false when the
    gate fails: the caller fails the stage). The reference is fp32, as every recorded score was computed. A
    replica in bf16/fp16 (`deploy.dtype`) may differ from it by `tolerance` + NOISE_FACTOR x the rounding noise
    measured in process, and its task scores may differ from fp32's on items that rounding can flip (any item
    whose choices are that close); an fp32 replica gets `tolerance` and must score every item as fp32 does."""
    gate = params.deploy.gate
    start = time.monotonic()
    model, tokenizer = load_checkpoint(model_dir, params.eval.device)
    max_length = model.config.max_position_embeddings
    reference_scores, reference = score_items(hf_lm(model, tokenizer, params.eval.batch_size), taskset,
                                              params.eval.num_fewshot, gate.items)
    noise = rounding_noise(model, tokenizer, params, taskset, reference)
    del model
    served_scores, served = score_items(
        served_lm(base_url, api_key, model_name, model_dir, max_length, params.deploy.slots), taskset,
        params.eval.num_fewshot, gate.items)
    allowed = gate.tolerance + NOISE_FACTOR * noise
    comparison = compare(served, reference, allowed)
    scores = {"served": _accuracies(served_scores), "in_process": _accuracies(reference_scores)}
    scores_equal = scores["served"] == scores["in_process"]
    avg = {side: sum(values.values()) / len(values) for side, values in scores.items()}
    exact = params.deploy.dtype == "fp32"
    message = comparison.describe()
    if not exact:
        message += f"; {params.deploy.dtype} rounding in process: up to {noise:.2e}"
    if not scores_equal:
        message += "; the task scores differ" + ("" if exact else f" ({params.deploy.dtype}: near-ties may flip)")
    return {
        "items_per_task": gate.items, "requests": comparison.compared, "tolerance": gate.tolerance,
        "dtype": params.deploy.dtype, "rounding_noise": noise if math.isfinite(noise) else None,
        "allowed": allowed if math.isfinite(allowed) else None,
        "max_abs_diff": comparison.max_abs_diff if math.isfinite(comparison.max_abs_diff) else None,
        "worst": item_name(comparison.worst) if comparison.worst else None,
        "scores": scores, "avg": avg, "scores_equal": scores_equal,
        "metric": {name: score.metric for name, score in served_scores.items()},
        "recorded": recorded_average(params, lineage),
        "passed": comparison.passed and (scores_equal or not exact),
        "message": message,
        "wall_s": round(time.monotonic() - start, 2),
    }


def summary(result: dict) -> str:
    """One line for the console: the comparison, the scores on the gate's items, the recorded average."""
    recorded = result["recorded"]
    beside = f"; recorded avg {100 * recorded['avg']:.2f} on all items ({recorded['from']})" if recorded else ""
    return (f"gate {'passed' if result['passed'] else 'FAILED'}: {result['message']}; avg on the first "
            f"{result['items_per_task']} items of each task: served {100 * result['avg']['served']:.2f}, "
            f"in process {100 * result['avg']['in_process']:.2f}{beside} ({result['wall_s']:.1f} s)")
