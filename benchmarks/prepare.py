"""The prepare stage on Ray Data: tokens per CPU-second vs the raw tokenizer and vs the previous
prepare (process pool), peak RSS per worker at 1× vs N× corpus, and a kill-and-rerun's time.

Why it is built this way: the machines are shared and noisy, so every contender runs in the same
invocation, in interleaved rounds (the order rotates each round), and ratios are taken within a
round (medians reported). Tokens per CPU-second, not wall time, is the headline: it divides by the
CPU time of every process the contender used (for the stage: the CLI, the local Ray it starts and
all of Ray's daemons and workers, polled over its whole process tree), so it says what the engine
costs beyond the tokenizer whatever else crowds the cores.

- raw: `Tokenizer.encode_batch(docs, bos=True)` on the same documents, already parsed and in memory,
  one thread (the stage's workers are pinned to one each), its own CPU time;
- previous: the prepare stage as of commit `BASELINE_COMMIT` (a parent reading + a
  ProcessPoolExecutor of tokenizers), checked out by `git archive` into a temporary tree;
- stage: today's `python -m tasks.cli prepare` in a subprocess.

The stage has a fixed cost a corpus never amortizes on this scale (a local Ray's start and stop, the
actors' start: ~20 CPU-seconds, more than tokenizing 10× the tiny corpus takes), so each round also
runs the stage on 1× and reports the marginal figure: (tokens at N× − tokens at 1×) ÷ (CPU at N× −
CPU at 1×), what each further token costs, which is what a terabyte corpus pays.

Peak RSS per worker: the largest RSS of any one tokenizer worker (Ray Data actor) at 1× and N×
the corpus. Kill and rerun, on `--kill-copies` copies (a run long enough that 60% of it is past Ray's
start): a clean run's wall time T, then a run SIGKILLed at 0.6·T and rerun; the rerun's wall time ÷ T
(sealed inputs are kept, so it redoes only the rest).

The corpus is the embedded one (deterministic) in the SlimPajama layout (`train/chunk<N>/*.jsonl.zst`,
4 files per copy); N× is N copies.

    .venv/bin/python benchmarks/prepare.py            # 5 rounds on 10x, kill and rerun on 150x (~5 min quiet)
    .venv/bin/python benchmarks/prepare.py --quick    # smoke run: smaller corpus, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_RAW = 0.8        # stage tokens per CPU-second ÷ the raw tokenizer's, at least
TARGET_PREVIOUS = 0.95  # stage tokens per CPU-second ÷ the previous prepare's, at least
TARGET_RSS_RATIO = 1.2  # peak RSS of one worker at N× ÷ at 1×, at most
TARGET_RERUN = 0.75     # rerun after a kill at 60% ÷ a clean run, wall time, at most
BASELINE_COMMIT = "4deaecd"  # the last commit with the process-pool prepare


def embedded_documents(entities: int, programs: int) -> list[str]:
    """The embedded corpus's documents (text, then code) at the given sizes."""
    from tasks.data.corpus import build_corpus

    corpus = build_corpus(seed=1234, entities=entities, programs=programs)
    return corpus.text_documents + corpus.code_documents


def write_slimpajama_file(path: Path, documents: list[str], repeat: int = 1) -> None:
    """`documents` (`repeat` times over) as one SlimPajama .jsonl.zst input."""
    import zstandard

    payload = "".join(json.dumps({"text": d, "meta": {"redpajama_set_name": "RedPajamaC4"}}) + "\n"
                      for d in documents).encode() * repeat
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(payload))


def write_corpus(root: Path, entities: int, programs: int, copies: int) -> Path:
    """The embedded corpus (the tiny profile's sizes) as SlimPajama-layout .jsonl.zst files,
    `copies` times over."""
    documents = embedded_documents(entities, programs)
    train = root / "train"
    for copy in range(copies):
        for index in range(4):
            write_slimpajama_file(train / f"chunk{copy + 1}" / f"example_train_{index}.jsonl.zst", documents[index::4])
    return train


def write_big_corpus(root: Path, entities: int, programs: int, files: int, copies_per_file: int) -> Path:
    """`files` inputs in the SlimPajama layout, each the embedded corpus `copies_per_file` times over: inputs
    of SlimPajama's size (~10M tokens a file at 25 copies), so the driver's per-input costs are amortized as
    at scale."""
    documents = embedded_documents(entities, programs)
    train = root / "train"
    for index in range(files):
        write_slimpajama_file(train / f"chunk{index + 1}" / "example_train_0.jsonl.zst", documents, copies_per_file)
    return train


def write_params(work: Path, corpus: Path, workers: int, code: Path = ROOT) -> Path:
    """`code`'s own params.yaml (each tree validates the fields it knows) pointed at `corpus` and `work`."""
    raw = yaml.safe_load((code / "params.yaml").read_text())
    raw["paths"] = {"data": str(work / "data"), "models": str(work / "models"), "metrics": str(work / "metrics")}
    raw["data"]["encode_processes"] = workers
    raw["data"]["rows_per_shard"] = 4096
    raw["data"]["sources"] = [{"name": "corpus", "format": "slimpajama", "uri": f"{corpus}/**/*.jsonl.zst",
                               "weight": 1.0}]
    raw["tokenizer"]["train_sources"] = ["corpus"]
    path = work / ("params.yaml" if code == ROOT else f"params-{code.name}.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def train_tokenizer(params_file: Path) -> None:
    from model.tokenizer import save_tokenizer_dir, train_sentencepiece
    from tasks.data.sources import iter_documents
    from tasks.params import load_params

    params = load_params(params_file)
    model = train_sentencepiece(iter_documents(params.data.sources[0], params), params.tokenizer.vocab_size,
                                max_sentences=200_000)
    save_tokenizer_dir(model, Path(params.paths.models) / "tokenizer")


def raw_encode(params_file: Path) -> dict:
    """Child mode: the baseline. Documents are read first (untimed); then only encode_batch,
    in chunks of the stage's size, one BOS per document counted like the stage counts it."""
    from model.tokenizer import Tokenizer
    from tasks.data.sources import SourceReader, parse_chunk
    from tasks.params import load_params

    params = load_params(params_file)
    source = params.data.sources[0]
    batches = [parse_chunk(source, chunk).documents for chunk in SourceReader(source, params).chunks()]
    tokenizer = Tokenizer.load(Path(params.paths.models) / "tokenizer")
    tokenizer.encode_batch(batches[0][:8])  # warm up
    started, cpu = time.perf_counter(), _cpu_seconds()
    tokens = sum(len(ids) for batch in batches for ids in tokenizer.encode_batch(batch, bos=True))
    return {"tokens": tokens, "seconds": time.perf_counter() - started,
            "cpu_seconds": _cpu_seconds() - cpu}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_raw(params_file: Path) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--raw-encode", str(params_file)], env=env, cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "tokens_per_cpu_s": result["tokens"] / result["cpu_seconds"]}


def previous_tree(tmp: Path) -> Path:
    """The repository as of BASELINE_COMMIT, for the previous prepare."""
    tree = tmp / "previous"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", BASELINE_COMMIT], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run_stage(params_file: Path, work: Path, code: Path = ROOT, kill_after_s: float | None = None,
              keep_staging: bool = False) -> dict:
    """The CLI of `code` in a subprocess: wall time, CPU time of its whole process tree (Ray's daemons and
    workers included: they are its descendants), peak RSS of the largest single worker."""
    import psutil

    if not keep_staging:
        shutil.rmtree(work / "data", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "tasks.cli", "prepare", "--params", str(params_file)],
                               cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parent = psutil.Process(process.pid)
    cpu_by_pid: dict[int, float] = {}
    peak_worker = 0
    while process.poll() is None:
        if kill_after_s is not None and time.perf_counter() - started >= kill_after_s:
            process.kill()
            process.wait()
            break
        try:
            tree = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            try:
                cpu_by_pid[proc.pid] = sum(proc.cpu_times()[:2])
                if "MapWorker" in " ".join(proc.cmdline()):  # a tokenizer worker (Ray Data actor)
                    peak_worker = max(peak_worker, proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(0.02)
    seconds, cpu = time.perf_counter() - started, sum(cpu_by_pid.values())
    if kill_after_s is not None and process.returncode and process.returncode < 0:
        return {"seconds": seconds, "killed": True}
    if process.returncode:
        raise SystemExit(f"prepare failed: {process.stderr.read().decode()[-3000:]}")
    manifest = json.loads((work / "data" / "prepared" / "manifest.json").read_text())
    splits = manifest["sources"]["corpus"]["splits"].values()
    tokens = sum(s["tokens"] + s["dropped_tokens"] for s in splits)
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu,
            "peak_worker_rss_mb": peak_worker / 2**20}


DRIVER_LINE = re.compile(r"prepare: (tokenized|packed) ([\d,]+) tokens in [\d.]+s; the driver used [\d.]+ CPU-s "
                         r"\(([\d,]+) tokens per driver CPU-second\)")


def run_stage_for_driver(params_file: Path, work: Path) -> dict:
    """The stage CLI once, clean: the tokens and driver CPU-seconds its two phases report."""
    shutil.rmtree(work / "data", ignore_errors=True)
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "prepare", "--params", str(params_file)], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"prepare failed: {out.stderr[-3000:]}")
    found = {phase: (int(tokens.replace(",", "")), int(tokens.replace(",", "")) / int(rate.replace(",", "")))
             for phase, tokens, rate in DRIVER_LINE.findall(out.stdout)}  # CPU-s from the rate: 1 ms resolution
    if set(found) != {"tokenized", "packed"}:
        raise SystemExit(f"prepare printed no driver lines:\n{out.stdout[-3000:]}")
    return found


def driver_rates(args) -> None:
    """`--driver`: what the driver process handles per second in each phase, on inputs of SlimPajama's size,
    as the marginal between `--driver` and twice as many inputs (the fixed costs apart), over `--rounds`
    interleaved rounds: what `data.seal_tokens_per_second` and `data.pack_tokens_per_second` should say for
    the head's CPU."""
    builtin = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["builtin"]
    with tempfile.TemporaryDirectory(prefix="bench-prepare-driver-") as tmp:
        works = {n: Path(tmp) / f"files{n}" for n in (args.driver, 2 * args.driver)}
        files = {n: write_params(work, write_big_corpus(work / "raw", builtin["entities"], builtin["programs"], n,
                                                        args.copies_per_file), args.workers)
                 for n, work in works.items()}
        train_tokenizer(files[args.driver])
        shutil.copytree(works[args.driver] / "models", works[2 * args.driver] / "models")
        rounds = []
        for round_ in range(args.rounds):
            sizes = sorted(works, reverse=bool(round_ % 2))
            runs = {n: run_stage_for_driver(files[n], works[n]) for n in sizes}
            small, big = runs[args.driver], runs[2 * args.driver]
            rates = {phase: (big[phase][0] - small[phase][0]) / (big[phase][1] - small[phase][1])
                     for phase in ("tokenized", "packed")}
            rounds.append(rates)
            print(f"round {round_ + 1}: {args.driver} vs {2 * args.driver} inputs of "
                  f"{small['packed'][0] // args.driver:,} tokens: driver CPU-s {small['tokenized'][1]:.1f} / "
                  f"{big['tokenized'][1]:.1f} sealing, "
                  f"{small['packed'][1]:.1f} / {big['packed'][1]:.1f} packing; marginal tokens per driver CPU-second "
                  f"sealing {rates['tokenized']:,.0f}, packing {rates['packed']:,.0f}", flush=True)
    report = {"inputs": args.driver, "copies_per_file": args.copies_per_file, "rounds": rounds,
              **{f"{phase}_tokens_per_driver_cpu_s": statistics.median(r[phase] for r in rounds)
                 for phase in ("tokenized", "packed")}}
    print(json.dumps(report, indent=2))
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "prepare-driver.json").write_text(json.dumps(report, indent=2) + "\n")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, one round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--copies", type=int, default=10, help="corpus copies for the rounds")
    parser.add_argument("--kill-copies", type=int, default=150, help="corpus copies for kill and rerun")
    parser.add_argument("--driver", type=int, metavar="INPUTS",
                        help="instead: the driver's tokens per CPU-second, INPUTS vs 2 x INPUTS inputs of SlimPajama's "
                             "size")
    parser.add_argument("--copies-per-file", type=int, default=25, help="corpus copies per input for --driver")
    parser.add_argument("--raw-encode", metavar="PARAMS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_encode:
        print(json.dumps(raw_encode(Path(args.raw_encode))))
        return
    if args.driver:
        driver_rates(args)
        return
    builtin = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["builtin"]
    entities, programs, rounds = (30, 400, 1) if args.quick else (builtin["entities"], builtin["programs"], args.rounds)
    copies, kill_copies = (2, 2) if args.quick else (args.copies, args.kill_copies)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        previous = previous_tree(Path(tmp))
        work1, work_n = Path(tmp) / "x1", Path(tmp) / f"x{copies}"
        params1 = write_params(work1, write_corpus(work1 / "raw", entities, programs, 1), args.workers)
        params_n = write_params(work_n, write_corpus(work_n / "raw", entities, programs, copies), args.workers)
        params_previous = write_params(work_n, work_n / "raw" / "train", args.workers, previous)
        train_tokenizer(params1)
        shutil.copytree(work1 / "models", work_n / "models")

        rounds_out = []
        contenders = {"raw": lambda: run_raw(params_n),
                      "previous": lambda: run_stage(params_previous, work_n, previous),
                      "stage": lambda: run_stage(params_n, work_n), "stage 1x": lambda: run_stage(params1, work1)}
        names = list(contenders)
        for round_ in range(rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            result = {name: contenders[name]() for name in order}
            result["vs_raw"] = result["stage"]["tokens_per_cpu_s"] / result["raw"]["tokens_per_cpu_s"]
            result["vs_previous"] = result["stage"]["tokens_per_cpu_s"] / result["previous"]["tokens_per_cpu_s"]
            big, one = result["stage"], result["stage 1x"]
            result["marginal_tokens_per_cpu_s"] = ((big["tokens"] - one["tokens"])
                                                   / (big["cpu_seconds"] - one["cpu_seconds"]))
            result["marginal_vs_raw"] = result["marginal_tokens_per_cpu_s"] / result["raw"]["tokens_per_cpu_s"]
            result["marginal_vs_previous"] = (result["marginal_tokens_per_cpu_s"]
                                              / result["previous"]["tokens_per_cpu_s"])
            rounds_out.append(result)
            print(f"{copies}x round {round_ + 1} ({', '.join(order)}): tokens per CPU-second raw "
                  f"{result['raw']['tokens_per_cpu_s']:,.0f}, previous {result['previous']['tokens_per_cpu_s']:,.0f}, "
                  f"stage {big['tokens_per_cpu_s']:,.0f} (marginal {result['marginal_tokens_per_cpu_s']:,.0f}): "
                  f"stage/raw {result['vs_raw']:.2f} (marginal {result['marginal_vs_raw']:.2f}), stage/previous "
                  f"{result['vs_previous']:.2f} (marginal {result['marginal_vs_previous']:.2f}); CPU 1x "
                  f"{one['cpu_seconds']:.1f}s, {copies}x {big['cpu_seconds']:.1f}s; wall previous "
                  f"{result['previous']['seconds']:.1f}s, stage {big['seconds']:.1f}s", flush=True)
        work_k = Path(tmp) / f"kill-x{kill_copies}"  # its own tree, whatever --copies is
        params_k = write_params(work_k, write_corpus(work_k / "raw", entities, programs, kill_copies),
                                args.workers)
        shutil.copytree(work1 / "models", work_k / "models")
        clean = run_stage(params_k, work_k)
        killed = run_stage(params_k, work_k, kill_after_s=0.6 * clean["seconds"])
        rerun = run_stage(params_k, work_k, keep_staging=True)
        print(f"kill at {killed['seconds']:.1f}s of a {clean['seconds']:.1f}s clean run; rerun {rerun['seconds']:.1f}s",
              flush=True)

    stage_rounds = [r["stage"] for r in rounds_out]
    report = {
        "workers": args.workers, "copies": copies, "rounds": rounds, "tokens": stage_rounds[0]["tokens"],
        "raw_tokens_per_cpu_s": statistics.median(r["raw"]["tokens_per_cpu_s"] for r in rounds_out),
        "previous_tokens_per_cpu_s": statistics.median(r["previous"]["tokens_per_cpu_s"] for r in rounds_out),
        "stage_tokens_per_cpu_s": statistics.median(s["tokens_per_cpu_s"] for s in stage_rounds),
        "stage_vs_raw": statistics.median(r["vs_raw"] for r in rounds_out),
        "stage_vs_previous": statistics.median(r["vs_previous"] for r in rounds_out),
        "stage_1x_cpu_seconds": statistics.median(r["stage 1x"]["cpu_seconds"] for r in rounds_out),
        "marginal_tokens_per_cpu_s": statistics.median(r["marginal_tokens_per_cpu_s"] for r in rounds_out),
        "marginal_vs_raw": statistics.median(r["marginal_vs_raw"] for r in rounds_out),
        "marginal_vs_previous": statistics.median(r["marginal_vs_previous"] for r in rounds_out),
        "previous_seconds": statistics.median(r["previous"]["seconds"] for r in rounds_out),
        "stage_seconds": statistics.median(s["seconds"] for s in stage_rounds),
        "peak_worker_rss_mb_1x": max(r["stage 1x"]["peak_worker_rss_mb"] for r in rounds_out),
        "peak_worker_rss_mb_nx": max(s["peak_worker_rss_mb"] for s in stage_rounds),
        "kill_copies": kill_copies,
        "clean_seconds": clean["seconds"], "killed_at_seconds": killed["seconds"], "rerun_seconds": rerun["seconds"],
    }
    report["rss_ratio"] = report["peak_worker_rss_mb_nx"] / report["peak_worker_rss_mb_1x"]
    report["rerun_ratio"] = rerun["seconds"] / clean["seconds"]
    for key, value in report.items():
        print(f"{key:>26}: {value:,.2f}" if isinstance(value, float) else f"{key:>26}: {value:,}")
    for label, value, target, ok in (
            ("stage / raw tokenizer, tokens per CPU-second", report["stage_vs_raw"], f">= {TARGET_RAW}",
             report["stage_vs_raw"] >= TARGET_RAW),
            ("stage / previous prepare, tokens per CPU-second", report["stage_vs_previous"], f">= {TARGET_PREVIOUS}",
             report["stage_vs_previous"] >= TARGET_PREVIOUS),
            ("stage / raw tokenizer, marginal tokens per CPU-second", report["marginal_vs_raw"], f">= {TARGET_RAW}",
             report["marginal_vs_raw"] >= TARGET_RAW),
            ("stage / previous prepare, marginal tokens per CPU-second", report["marginal_vs_previous"],
             f">= {TARGET_PREVIOUS}", report["marginal_vs_previous"] >= TARGET_PREVIOUS),
            (f"peak RSS per worker {copies}x / 1x", report["rss_ratio"], f"<= {TARGET_RSS_RATIO}",
             report["rss_ratio"] <= TARGET_RSS_RATIO),
            (f"rerun after a kill at 60% / clean run, wall ({kill_copies}x)", report["rerun_ratio"],
             f"<= {TARGET_RERUN}",
             report["rerun_ratio"] <= TARGET_RERUN)):
        print(f"{label}: {value:.2f}, target {target}: {verdict(ok)}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
