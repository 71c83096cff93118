"""One chat model's scorecard: the milestones' lm-eval suite plus the chat accuracy columns, logged to MLflow.

The lm-eval suite and val perplexity come from the evaluate stage's own scorer (same tasks, same
cache keyed by weights), so a variant's row compares with its base milestone's row of eval.json.
The chat accuracy (chat_accuracy.py) is measured in the variant's template for the base milestone
too: that is the "before" of the base → SFT → SFT+DPO comparison.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.evaluate.checkpoints import read_checkpoint
from tasks.evaluate.mlflow_log import result_metrics
from tasks.evaluate.scoring import score_checkpoint
from tasks.params import Params


def evaluate_model(params: Params, inputs, taskset, directory: Path, name: str, template_source: str, items) -> dict:
    """{"milestone" (name), "tokens", "scores", "avg", "val_ppl", ..., "chat_accuracy" (held-out
    wordings), "chat": {"columns", "examples", "wall_s"}}."""
    from model.hf import load_hf
    from model.tokenizer import Tokenizer
    from tasks.sft.chat_accuracy import chat_accuracy

    result = score_checkpoint(params, inputs, taskset, read_checkpoint(directory, name))
    started = time.perf_counter()
    chat = chat_accuracy(load_hf(directory), Tokenizer.load(directory), template_source, items,
                         params.sft.chat_eval.max_new_tokens)
    chat["wall_s"] = round(time.perf_counter() - started, 2)
    return {**result, "chat_accuracy": chat["accuracy"], "chat": chat}


def chat_metrics(chat: dict) -> dict[str, float]:
    """`chat/<column>/accuracy`, `.../ci95_low`, `.../ci95_high` and `.../n` of a chat result."""
    out = {}
    for column, row in chat["columns"].items():
        out |= {f"chat/{column}/accuracy": row["accuracy"], f"chat/{column}/ci95_low": row["ci95"][0],
                f"chat/{column}/ci95_high": row["ci95"][1], f"chat/{column}/n": row["n"]}
    return out


def log_evaluation(client, run_id: str, prefix: str, result: dict, step: int) -> None:
    """`<prefix>/eval/<task>/<metric>`, `<prefix>/eval/avg`, `<prefix>/chat_accuracy` (held-out
    wordings), `<prefix>/chat/<column>/...` into the variant's run, and every column's answers and
    first replies as `chat_eval/<prefix>.json`."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {f"{prefix}/{key}": value for key, value in result_metrics(result).items()}
    values[f"{prefix}/chat_accuracy"] = result["chat_accuracy"]
    values |= {f"{prefix}/{key}": value for key, value in chat_metrics(result["chat"]).items()}
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in values.items()])
    client.log_text(run_id, json.dumps(result["chat"], indent=1, ensure_ascii=False), f"chat_eval/{prefix}.json")
