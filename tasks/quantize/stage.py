"""`tinyllama quantize --params FILE`: GGUF files for llama.cpp, and int8 and bf16 on our engine, measured.

1. Check everything the user can get wrong before any output exists: the source (registry ref or
   dir; a Llama with every tensor and a SentencePiece tokenizer), the GGUF paths (an existing one is
   refused unless `quantize.overwrite` or `--overwrite`), the val split, the eval tasks.
2. Export each `quantize.types` GGUF (model/gguf.py, atomic) with the source's lineage in its metadata.
3. Measure every type against fp32 ours on the prepared val split the way llama.cpp's perplexity
   tool does (measures.py), GGUFs through llama.cpp itself, plus the milestones' lm-eval average.
4. Write metrics/quantize.json and the table, log one MLflow run linked to the source's run and
   register each GGUF. A type that misses its `quantize.gates` fails the stage (exit 1) after the
   reports are written, so the numbers that failed it are there to read; nothing is registered then.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tasks.errors import UserError
from tasks.layout import Layout
from tasks.params import Params, add_params_argument, load_params
from tasks.quantize.report import TABLE_FILE, write_reports
from tasks.quantize.source import Source, resolve_source

BOS_ID = 1
REFERENCE = "fp32"


class GateFailure(Exception):
    """A quantized type missed a quality gate of `quantize.gates`."""


def gguf_paths(params: Params, source: Source) -> dict[str, Path]:
    out = Layout.from_params(params).quantized_dir
    return {qtype: out / f"{source.name}-{qtype}.gguf" for qtype in params.quantize.types}


def shown(path: Path) -> str:
    """A path as metrics record it: relative to the repo (cwd) when inside it, so the committed
    metrics file does not depend on where the repo was cloned."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _load_source(source: Source):
    """Our fp32 Llama from the source dir; another architecture, a missing tensor or tokenizer is bad input."""
    from model.gguf import read_vocab
    from model.hf import load_hf

    try:
        model = load_hf(source.directory)
        read_vocab(source.directory, model.config.vocab_size)
    except ValueError as exc:
        raise UserError(f"quantize.source: {source.directory}: {exc}") from None
    return model


def _val_chunks(params: Params, config) -> tuple[list[tuple[list[int], int]], int]:
    """(chunks, n_ctx): one chunk per prepared val row, as long as the row and the model's context allow."""
    from tasks.evaluate.perplexity import val_rows
    from tasks.quantize.measures import chunk

    rows = val_rows(Layout.from_params(params).prepared_dir, params.quantize.val_rows)
    if int(rows.max()) >= config.vocab_size:
        raise UserError(f"quantize.source: vocab {config.vocab_size} is smaller than the prepared data's token ids "
                        f"(max {int(rows.max())}): tokenizer mismatch")
    n_ctx = min(config.max_seq_len, rows.shape[1])
    return [chunk(row, n_ctx, BOS_ID) for row in rows], n_ctx


def _state_bytes(model) -> int:
    """Bytes of every distinct tensor of a model (tied weights once): a bf16 or int8 engine's footprint."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _load_ours(variant: str, directory):
    """The source as our engine runs it in `variant`: bf16 weights (`serve --dtype bf16`, the GPU profile's
    deployment) or int8 (`serve --quant int8`, model/quant.py)."""
    import torch

    from model.hf import load_hf
    from model.quant import quantize_int8

    if variant == "bf16":
        return load_hf(directory, dtype=torch.bfloat16)
    return quantize_int8(load_hf(directory))


def _open_engines(params: Params, source: Source, model, files: dict) -> dict:
    """fp32 ours (the reference), bf16 and int8 ours, on `eval.device`; llama.cpp per GGUF, on the CPU; each
    with the model's whole context."""
    from tasks.quantize.engines import LlamaCppEngine, OursEngine

    engines = {REFERENCE: OursEngine(model, params.eval.device)}
    for variant in params.quantize.ours:
        engines[variant] = OursEngine(_load_ours(variant, source.directory), params.eval.device)
    for qtype, exported in files.items():
        engines[qtype] = LlamaCppEngine(exported.path, model.config.max_seq_len, params.quantize.threads)
    return engines


def measure(engines: dict, chunks: list[tuple[list[int], int]]) -> dict[str, dict]:
    """llama.cpp's perplexity statistics of every engine against the reference, chunk by chunk."""
    import torch

    from tasks.quantize.measures import KlStats

    stats = {name: KlStats() for name in engines}
    for tokens, first in chunks:
        base = engines[REFERENCE].logits(tokens)[first:-1]
        targets = torch.tensor(tokens[first + 1:])
        for name, engine in engines.items():
            logits = base if name == REFERENCE else engine.logits(tokens)[first:-1]
            stats[name].add(base, logits, targets)
    return {name: s.summary() for name, s in stats.items()}


def check_gates(params: Params, rows: dict[str, dict]) -> None:
    """Adds {"gate": {..., "passed", "failures"}} to each gated row."""
    for name, gate in params.quantize.gates.items():
        row, failures = rows[name], []
        if gate.max_ppl_ratio is not None and row["ppl_ratio"] > gate.max_ppl_ratio:
            failures.append(f"PPL ratio {row['ppl_ratio']:.4f} > {gate.max_ppl_ratio}")
        if gate.min_same_top is not None and row["same_top"] < gate.min_same_top:
            failures.append(f"same top {100 * row['same_top']:.2f}% < {100 * gate.min_same_top:.2f}%")
        row["gate"] = {**gate.model_dump(exclude_none=True), "passed": not failures, "failures": failures}


def _preflight(params: Params, overwrite: bool):
    """Everything the user can get wrong, checked before any output exists: (source, GGUF paths, model)."""
    from model.devices import check_device
    from tasks.quantize.mlflow_log import check_source_run

    try:
        check_device(params.eval.device, "eval.device")  # where our engine's rows are computed
    except ValueError as exc:
        raise UserError(str(exc)) from None
    source = resolve_source(params)
    check_source_run(params, source.run_id)
    paths = gguf_paths(params, source)
    if not (overwrite or params.quantize.overwrite):
        for path in paths.values():
            if path.exists():
                raise UserError(f"{path}: exists (set quantize.overwrite: true or pass --overwrite to replace it)")
    return source, paths, _load_source(source)


def _score(params: Params, source: Source, model, files: dict, chunks: list, taskset) -> dict[str, dict]:
    """Every engine's row: llama.cpp's perplexity statistics, the eval average, our variants' footprints."""
    from tasks.quantize.harness import eval_scores, load_tokenizer

    engines = _open_engines(params, source, model, files)
    try:
        rows = measure(engines, chunks)
        if taskset is not None:
            tokenizer = load_tokenizer(source.directory)
            for name, engine in engines.items():
                rows[name]["eval_avg"] = eval_scores(engine, tokenizer, taskset, params.eval)["avg"]
        for variant in params.quantize.ours:
            rows[variant]["size_bytes"] = _state_bytes(engines[variant].model)
    finally:
        for engine in engines.values():
            engine.close()
    rows[REFERENCE]["size_bytes"] = sum(p.stat().st_size for p in source.directory.glob("*.safetensors"))
    for qtype, exported in files.items():
        rows[qtype].update(size_bytes=exported.size_bytes, file=shown(exported.path), kept_f16=list(exported.kept_f16))
    for name, row in rows.items():
        row["engine"] = "llama.cpp" if name in files else "ours"
    return {name: rows[name] for name in (REFERENCE, *params.quantize.ours, *files)}


def _compared_evals(params: Params) -> Params:
    """`params` with the eval settings the types' averages use: `quantize.eval_limit` items per task when set.
    The same items for every type (a paired comparison); llama.cpp scores each GGUF on the CPU one request at a
    time, which on the GPU profile's full suite (~69k requests a type) would take hours a type."""
    if params.quantize.eval_limit is None:
        return params
    return params.model_copy(update={"eval": params.eval.model_copy(update={"limit": params.quantize.eval_limit})})


def quantize(params: Params, overwrite: bool = False) -> dict:
    from model.gguf import export_gguf
    from tasks.evaluate.stage import settings_note
    from tasks.evaluate.tasksets import build_taskset
    from tasks.quantize.mlflow_log import log_run

    start = time.perf_counter()
    source, paths, model = _preflight(params, overwrite)
    chunks, n_ctx = _val_chunks(params, model.config)
    compared = _compared_evals(params)
    with tempfile.TemporaryDirectory(prefix="tinyllama-quantize-") as include_dir:
        taskset = build_taskset(compared, Path(include_dir)) if params.quantize.evaluate else None
        files = {qtype: export_gguf(source.directory, path, qtype, source.lineage, source.name, overwrite=True)
                 for qtype, path in paths.items()}
        rows = _score(compared, source, model, files, chunks, taskset)
    check_gates(params, rows)
    metrics = {
        "name": source.name,
        "source": {**source.lineage, "dir": shown(source.directory)},
        "n_ctx": n_ctx, "chunks": len(chunks), "scored_tokens": rows[REFERENCE]["tokens"],
        "eval_settings": f"{', '.join(params.eval.tasks)}; {settings_note(compared, taskset)}" if taskset else None,
        "types": rows,
        "gates_passed": all(row["gate"]["passed"] for row in rows.values() if "gate" in row),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    layout = Layout.from_params(params)
    reports = write_reports(layout, metrics)
    metrics["mlflow_run_id"] = log_run(params, metrics, reports, {q: f.path for q, f in files.items()},
                                       register=metrics["gates_passed"])
    write_reports(layout, metrics)
    if not metrics["gates_passed"]:
        failed = [f"{name}: {'; '.join(row['gate']['failures'])}" for name, row in rows.items()
                  if "gate" in row and not row["gate"]["passed"]]
        raise GateFailure("quality gate failed: " + " | ".join(failed))
    return metrics


def add_arguments(parser) -> None:
    add_params_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace GGUF files that already exist")


def main(args) -> int:
    from tasks.logs import stage_log

    params = load_params(args.params)
    layout = Layout.from_params(params)
    with stage_log("quantize", params):
        import torch  # inside the stage's log: what torch brings in (tqdm) sees its settings

        torch.set_num_threads(params.quantize.threads)
        try:
            metrics = quantize(params, overwrite=args.overwrite)
        except GateFailure as exc:
            print(f"tinyllama quantize: {exc} (see {shown(layout.report_file(TABLE_FILE))})")
            return 1
        for name, row in metrics["types"].items():
            print(f"{name:>5}  {row['size_bytes'] / 1e6:8.2f} MB  ppl ratio {row['ppl_ratio']:.4f}  "
                  f"KLD {row['kld']:.6f}  same top {100 * row['same_top']:6.2f}%"
                  + (f"  eval avg {100 * row['eval_avg']:.2f}" if row.get("eval_avg") is not None else ""))
        print(f"wrote {', '.join(metrics['types'][q]['file'] for q in params.quantize.types)}, "
              f"{shown(layout.metrics_file('quantize'))}, {TABLE_FILE} (MLflow run {metrics['mlflow_run_id']})")
    return 0
