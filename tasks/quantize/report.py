"""What users read: `metrics/quantize.json` (DVC metrics) and an EVAL.md-style markdown table.

One row per type, fp32 (ours, the reference) first: file size, perplexity on the val chunks, and the
three numbers llama.cpp's perplexity tool reports against a reference (PPL ratio, mean KL
divergence, same top token), then the lm-eval average of the milestones' suite.
"""

from __future__ import annotations

from pathlib import Path

from tasks.files import write_atomic, write_json_atomic
from tasks.layout import Layout

TABLE_FILE = "quantize_table.md"


def _cell(value, fmt: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, fmt)


def markdown_table(metrics: dict) -> str:
    header = ["Type", "Engine", "Size (MB)", "PPL", "PPL ratio", "Mean KLD", "Same top (%)", "eval avg", "Gate"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * 6 + "---|"]
    for name, row in metrics["types"].items():
        ratio = _cell(row.get("ppl_ratio"), ".4f")
        if row.get("ppl_ratio_unc"):
            ratio += f" ± {row['ppl_ratio_unc']:.4f}"
        gate = row.get("gate")
        lines.append("| " + " | ".join([
            name, row["engine"], _cell(row["size_bytes"], ".2f", 1e-6), _cell(row.get("ppl"), ".3f"), ratio,
            _cell(row.get("kld"), ".6f"), _cell(row.get("same_top"), ".2f", 100),
            _cell(row.get("eval_avg"), ".2f", 100),
            "—" if gate is None else ("pass" if gate["passed"] else "**FAIL**: " + "; ".join(gate["failures"])),
        ]) + " |")
    kept = [f"{name}: {', '.join(row['kept_f16'])}" for name, row in metrics["types"].items() if row.get("kept_f16")]
    notes = [
        f"Source `{metrics['source']['source']}` ({metrics['source']['dir']}). Reference: fp32 ours. "
        f"{metrics['chunks']} val chunks of n_ctx={metrics['n_ctx']} (BOS first, second half scored, as llama.cpp's "
        f"perplexity tool does): {metrics['scored_tokens']} scored tokens.",
        "GGUF rows are computed by llama.cpp (llama-cpp-python) from the file; int8 (model/quant.py) and bf16 "
        "(weights and activations in bf16, as `serve --dtype bf16` runs) are our engine. "
        "eval avg: the milestones' lm-eval suite ×100"
        + (f" ({metrics['eval_settings']})." if metrics.get("eval_settings") else "."),
        "Tensors kept F16 (row length not a multiple of the block size): "
        + ("; ".join(kept) if kept else "none") + ".",
    ]
    return f"## Quantization: {metrics['name']}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_reports(layout: Layout, metrics: dict) -> list[Path]:
    return [write_json_atomic(layout.metrics_file("quantize"), metrics),
            write_atomic(layout.report_file(TABLE_FILE), markdown_table(metrics).encode())]
