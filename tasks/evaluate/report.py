"""The outputs users read: eval.json (DVC metrics), an EVAL.md-style table (markdown + CSV) and a
PNG of every task and the average against tokens seen.

The markdown mirrors TinyLlama's EVAL.md (scores ×100, two decimals, one row per checkpoint) so the
two tables can be read side by side; the CSV keeps raw fractions for machines.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from tasks.files import write_atomic, write_json_atomic
from tasks.layout import EVAL_REPORT_FILES, Layout
from tasks.params import format_tokens

# EVAL.md's column titles for the benchmarks it reports; other tasks keep their own names.
DISPLAY_NAMES = {"hellaswag": "HellaSwag", "openbookqa": "Obqa", "winogrande": "WinoGrande",
                 "arc_challenge": "ARC_c", "arc_easy": "ARC_e", "boolq": "boolq", "piqa": "piqa"}


def eval_metrics(results: list[dict], tasks: list[str]) -> dict:
    """CONTRACTS.md `eval.json`: {milestone: {"tokens", <task>: score, ..., "avg", "val_ppl"}}."""
    return {r["milestone"]: {"tokens": r["tokens"], **{t: r["scores"][t]["value"] for t in tasks},
                             "avg": r["avg"], "val_ppl": r["val_ppl"]} for r in results}


def result_line(result: dict) -> str:
    """One checkpoint's scores on one line, for the console: name, tokens, avg, each task, val ppl, time."""
    tasks = " ".join(f"{name} {100 * score['value']:.1f}" for name, score in result["scores"].items())
    how = "cached" if result.get("cached") else f"{result['wall_s']:.0f} s"
    return (f"{result['milestone']} ({format_tokens(result['tokens'])} tokens): "
            f"avg {100 * result['avg']:.2f} | {tasks} "
            f"| val ppl {result['val_ppl']:.2f} ({how})")


def markdown_table(results: list[dict], tasks: list[str], settings: str) -> str:
    header = ["Milestone", "Pretrain Tokens", *(DISPLAY_NAMES.get(t, t) for t in tasks), "avg", "val ppl"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for r in results:
        cells = [r["milestone"], format_tokens(r["tokens"]), *(f"{100 * r['scores'][t]['value']:.2f}" for t in tasks),
                 f"{100 * r['avg']:.2f}", f"{r['val_ppl']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    metrics = ", ".join(f"{t}: {results[0]['scores'][t]['metric']}" for t in tasks) if results else ""
    return ("## Evaluation by milestone\n\n" + "\n".join(lines) +
            f"\n\nScores ×100 ({metrics}); {settings}. val ppl: perplexity on the prepared val split.\n")


def csv_table(results: list[dict], tasks: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["milestone", "tokens", *tasks, "avg", "val_ppl"])
    for r in results:
        writer.writerow([r["milestone"], r["tokens"], *(r["scores"][t]["value"] for t in tasks), r["avg"],
                         r["val_ppl"]])
    return out.getvalue()


def plot_png(results: list[dict], tasks: list[str], chance: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for task in tasks:
        ax.plot(tokens, [100 * r["scores"][task]["value"] for r in results], marker="o", linewidth=1,
                label=DISPLAY_NAMES.get(task, task))
    ax.plot(tokens, [100 * r["avg"] for r in results], marker="s", linewidth=2.5, color="black", label="avg")
    if chance is not None:
        ax.axhline(100 * chance, linestyle="--", color="gray", linewidth=1, label="chance (avg)")
    if len(tokens) > 1 and max(tokens) >= 10 * min(tokens):
        ax.set_xscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("score (×100)")
    ax.set_title("lm-eval score vs pretraining tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def write_reports(layout: Layout, results: list[dict], tasks: list[str], settings: str,
                  chance: float | None) -> list[Path]:
    """Write eval.json and the three reports beside it atomically; returns their paths in that order."""
    json_file = layout.metrics_file("eval")
    md_file, csv_file, png_file = (layout.report_file(name) for name in EVAL_REPORT_FILES)
    return [
        write_json_atomic(json_file, eval_metrics(results, tasks)),
        write_atomic(md_file, markdown_table(results, tasks, settings).encode()),
        write_atomic(csv_file, csv_table(results, tasks).encode()),
        write_atomic(png_file, plot_png(results, tasks, chance)),
    ]
