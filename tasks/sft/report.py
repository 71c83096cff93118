"""What the alignment stages leave for people: per-variant metrics (DVC) and an EVAL.md-style table.

`sft.json` / `dpo.json`: {variant: {"base_milestone", "template", "mlflow_run_id", "<model>": {"tokens",
<task>: score, ..., "avg", "val_ppl", "chat_accuracy" (held-out wordings), "chat": {column: {"correct",
"n", "accuracy", "ci95", "answers"}}, and for trained models the training numbers}}} where <model> is
`base`, `sft` or `dpo`. The table has one row per (variant, model): the scores ×100 like
eval_table.md, and each chat column with its 95% interval, so base → SFT → SFT+DPO read top to
bottom; below it, SFT+DPO against SFT on the same questions (paired).
"""

from __future__ import annotations

from tasks.evaluate.report import DISPLAY_NAMES
from tasks.params import format_tokens
from tasks.sft.intervals import paired
from tasks.sft.wordings import SPLIT_VERSION
from tasks.sft.world_chat import COLUMNS

MODEL_NAMES = {"base": "base", "sft": "SFT", "dpo": "SFT+DPO"}


def model_metrics(result: dict, tasks: list[str], training: dict | None = None) -> dict:
    row = {"tokens": result["tokens"], **{t: result["scores"][t]["value"] for t in tasks},
           "avg": result["avg"], "val_ppl": result["val_ppl"], "chat_accuracy": result["chat_accuracy"],
           "chat": result["chat"]["columns"]}
    return {**row, **(training or {})}


def _cell(column: dict | None) -> str:
    if column is None:
        return "–"
    low, high = column["ci95"]
    return f"{100 * column['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _paired_lines(metrics: dict) -> list[str]:
    lines = []
    for variant, entry in metrics.items():
        if "sft" not in entry or "dpo" not in entry:
            continue
        for column in COLUMNS:
            first, second = entry["sft"].get("chat", {}).get(column), entry["dpo"].get("chat", {}).get(column)
            if first is None or second is None or len(first["answers"]) != len(second["answers"]):
                continue
            result = paired(first["answers"], second["answers"])
            low, high = result["ci95"]
            lines.append(f"| {variant} | {column} | {100 * result['diff']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] "
                         f"| {result['c']} / {result['b']} | {result['p_mcnemar']:.3f} |")
    if not lines:
        return []
    return ["", "SFT+DPO vs SFT on the same questions (paired): the difference in points with its 95% interval, "
            "questions only SFT+DPO / only SFT answered, McNemar's exact p.", "",
            "| Variant | Column | SFT+DPO − SFT | gained / lost | p |", "|---|---|---:|---:|---:|", *lines]


def chat_table(metrics: dict, tasks: list[str], settings: str) -> str:
    header = ["Variant", "Base", "Model", "Pretrain Tokens", *(DISPLAY_NAMES.get(t, t) for t in tasks), "avg",
              *(f"chat {column}" for column in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]
    for variant, entry in metrics.items():
        for model in ("base", "sft", "dpo"):
            if model not in entry:
                continue
            row = entry[model]
            cells = [variant, entry["base_milestone"], MODEL_NAMES[model], format_tokens(row["tokens"]),
                     *(f"{100 * row[t]:.2f}" for t in tasks), f"{100 * row['avg']:.2f}",
                     *(_cell(row.get("chat", {}).get(column)) for column in COLUMNS)]
            lines.append("| " + " | ".join(cells) + " |")
    return ("## Chat variants: base vs SFT vs SFT+DPO\n\n" + "\n".join(lines + _paired_lines(metrics)) +
            f"\n\nScores ×100 as in eval_table.md ({settings}). chat: questions about people no chat example "
            "names, answered greedily in the variant's chat template; right when the reply names the true value "
            f"and no other; accuracy % with its Wilson 95% interval. seen: wordings the SFT/DPO examples use; "
            f"held-out: wordings none uses ({SPLIT_VERSION}, tasks/sft/wordings.py; the champion is chosen on "
            "this column); multi-turn: a follow-up about the person named the turn before.\n")
