"""What the alignment stages leave for people: per-variant metrics (DVC) and an EVAL.md-style table.

`sft.json` / `dpo.json`: {variant: {"base_milestone", "template", "mlflow_run_id", "<model>": {"tokens",
<task>: score, ..., "avg", "val_ppl", "chat_accuracy", and for trained models the training numbers}}}
where <model> is `base`, `sft` or `dpo`. The table has one row per (variant, model): the scores ×100
like eval_table.md, and the chat accuracy, so base → SFT → SFT+DPO read top to bottom.
"""

from __future__ import annotations

from tasks.evaluate.report import DISPLAY_NAMES
from tasks.params import format_tokens

MODEL_NAMES = {"base": "base", "sft": "SFT", "dpo": "SFT+DPO"}


def model_metrics(result: dict, tasks: list[str], training: dict | None = None) -> dict:
    row = {"tokens": result["tokens"], **{t: result["scores"][t]["value"] for t in tasks},
           "avg": result["avg"], "val_ppl": result["val_ppl"], "chat_accuracy": result["chat_accuracy"]}
    return {**row, **(training or {})}


def chat_table(metrics: dict, tasks: list[str], settings: str) -> str:
    header = ["Variant", "Base", "Model", "Pretrain Tokens", *(DISPLAY_NAMES.get(t, t) for t in tasks), "avg",
              "chat acc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]
    for variant, entry in metrics.items():
        for model in ("base", "sft", "dpo"):
            if model not in entry:
                continue
            row = entry[model]
            cells = [variant, entry["base_milestone"], MODEL_NAMES[model], format_tokens(row["tokens"]),
                     *(f"{100 * row[t]:.2f}" for t in tasks), f"{100 * row['avg']:.2f}",
                     f"{100 * row['chat_accuracy']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return ("## Chat variants: base vs SFT vs SFT+DPO\n\n" + "\n".join(lines) +
            f"\n\nScores ×100 as in eval_table.md ({settings}). chat acc: held-out questions answered "
            "greedily in the variant's chat template whose reply names the true value and no other.\n")
