"""Serving throughput and latency through the OpenAI HTTP API, against sequential baselines in the same run.

  .venv/bin/python benchmarks/serve.py --tiny models/pretrain/1M --draft models/pretrain/100K \\
      [--gguf tiny=FILE.gguf --gguf 55m=FILE.gguf]
  .venv/bin/python benchmarks/serve.py --quick          # smoke run: fewer requests and tokens

For each model (the pipeline's tiny milestone, and the 55M benchmark config with seeded random
weights and Llama 2's tokenizer from shared/assets), one invocation measures, on the same weights
and prompts:
- ours: `tinyllama serve` (Ray Serve, continuous batching, 2 threads), streamed completions at
  concurrency 1, 8 and 32: aggregate completion tokens/s, p50/p95 time to first token and time per
  output token after the first;
- transformers `generate` (greedy, sequential, 2 threads) on the same HF dir;
- llama.cpp via llama-cpp-python (sequential, 2 threads) on the F16 GGUF of the same weights, given
  with `--gguf NAME=FILE` or exported with `model.gguf.export_gguf` when this build has it.
Then speculative decoding on the tiny model, greedy, in process: plain decoding against prompt lookup
on input-grounded prompts (documents of the corpus the model learned, to continue) and against the
draft model (`--draft`, an earlier milestone) on open prompts: speedup, acceptance, identical text.
Targets (55M): concurrency 32 ≥ 4× our concurrency 1 and ≥ 2× llama.cpp; prompt lookup ≥ 1.5×.
And the prompt cache (`--parts prompt-cache`): two requests sharing a prefix of ¾ of the context (192
tokens on tiny, 384 on the 55M config), one after the other, through HTTP and on the engine alone: the
second's time to first token against the first's (target ≥ 3× lower).
Results: benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
RESULTS = ROOT / "benchmarks" / "results"
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "assets" / "tokenizer" / "llama2c_tokenizer.model"
THREADS = 2

OPEN_PROMPTS = ["Marseille is a city", "The pet of", "values = [", "Many people live", "scores = [0,",
                "The home of", "print(max(", "data = [17,", "In the morning", "The capital of", "def add(a, b):",
                "Once upon a time", "import os", "The river", "for i in range(", "The old town"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_55m_dir(work: Path) -> Path:
    """The 55M benchmark config with seeded random weights and Llama 2's tokenizer, as a HF dir."""
    import torch

    from model.config import bench_55m
    from model.hf import save_hf
    from model.llama import Llama
    from model.tokenizer import save_tokenizer_dir

    out = work / "bench-55m"
    if (out / "model.safetensors").is_file():
        return out
    tokenizer = save_tokenizer_dir(LLAMA2_TOKENIZER.read_bytes(), work / "llama2-tokenizer")
    torch.manual_seed(0)
    save_hf(Llama(bench_55m()), out, tokenizer_dir=tokenizer)
    return out


def tiny_random_dir(work: Path) -> Path:
    """The tiny config with seeded random weights and a tokenizer fitted to the embedded corpus, when no
    pipeline milestone is at hand (the prompt cache's timing depends on the shapes, not the weights)."""
    import torch

    from model.config import tiny
    from model.hf import save_hf
    from model.llama import Llama
    from model.tokenizer import save_tokenizer_dir, train_sentencepiece
    from tasks.data.corpus import build_corpus

    out = work / "tiny-random"
    if (out / "model.safetensors").is_file():
        return out
    corpus = build_corpus(seed=1234, entities=24, programs=1500)
    texts = corpus.text_documents[:200] + corpus.code_documents[:400]
    tokenizer = save_tokenizer_dir(train_sentencepiece(texts, tiny().vocab_size, max_sentences=100_000),
                                   work / "tiny-tokenizer")
    torch.manual_seed(0)
    save_hf(Llama(tiny()), out, tokenizer_dir=tokenizer)
    return out


def grounded_prompts(count: int) -> list[str]:
    """Starts of documents from the corpus the tiny model learned: continuing them re-uses names,
    lists and phrases already in the prompt, what prompt lookup drafts from."""
    from tasks.data.corpus import build_corpus

    corpus = build_corpus(seed=1234, entities=24, programs=1500)
    docs = [d for d in corpus.code_documents[:count // 2]] + [d for d in corpus.text_documents[:count // 2]]
    return [d[:int(len(d) * 0.6)] for d in docs]


# ---------------------------------------------------------------- ours, through HTTP


def start_server(model_dir: Path, port: int, log: Path, slots: int, stream_interval: int, *flags: str):
    from servers import start, wait_http

    command = [str(Path(sys.executable).parent / "tinyllama"), "serve", "--model", str(model_dir), "--name", "bench",
               "--port", str(port), "--slots", str(slots), "--max-waiting", "256", "--cpus", str(THREADS),
               "--max-queued-requests", "64",  # Serve's proxy must not 429 a 32-client burst the engine would queue
               "--stream-interval", str(stream_interval), *flags]
    proc = start(command, log, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_http(f"http://127.0.0.1:{port}/health", 600, proc, log)
    return proc


async def _one(http, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": (first or time.perf_counter()) - start,
            "tpot": (last - first) / (tokens - 1) if first and tokens > 1 else None, "tokens": tokens}


async def http_load(url: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    queue = [prompts[i % len(prompts)] for i in range(requests)]
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client():
            while queue:
                results.append(await _one(http, url, queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    return {"concurrency": concurrency, "requests": requests, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_ms": round(percentile(ttft, 0.5) * 1000, 1),
            "ttft_p95_ms": round(percentile(ttft, 0.95) * 1000, 1),
            "tpot_p50_ms": round(percentile(tpot, 0.5) * 1000, 2) if tpot else None,
            "tpot_p95_ms": round(percentile(tpot, 0.95) * 1000, 2) if tpot else None}


def ours(model_dir: Path, prompts: list[str], work: Path, quick: bool, max_tokens: int,
         stream_interval: int = 1, compile: bool = True) -> list[dict]:
    from servers import free_port, stop

    port, started = free_port(), time.perf_counter()
    proc = start_server(model_dir, port, work / f"serve-{model_dir.name}.log", 32, stream_interval,
                        *(["--compile"] if compile else []))
    start_s = round(time.perf_counter() - started, 1)  # Ray, Serve and the replica's load (and compile)
    print(f"  ours (interval {stream_interval}) {model_dir.name:10s} server up in {start_s} s", flush=True)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(http_load(url, prompts, 2, 4, 8))  # warm-up: first allocations, first connections
        rows = []
        for concurrency in (1, 8, 32):
            requests = concurrency * (1 if quick else 2) if concurrency > 1 else (2 if quick else 8)
            rows.append({"stream_interval": stream_interval, "server_start_s": start_s,
                         **asyncio.run(http_load(url, prompts, concurrency, requests, max_tokens))})
            print(f"  ours (interval {stream_interval}) {model_dir.name:10s} c={concurrency:2d}: "
                  f"{rows[-1]['tokens_per_s']:7.1f} tok/s  "
                  f"TTFT p50 {rows[-1]['ttft_p50_ms']} ms  TPOT p50 {rows[-1]['tpot_p50_ms']} ms", flush=True)
        return rows
    finally:
        stop(proc, grace=60)


def engine_direct(model_dir: Path, prompts: list[str], requests: int, max_tokens: int, compile: bool = True) -> dict:
    """The same continuous batching without HTTP or Ray (32 slots, every request queued at once): how
    much of the HTTP figure the engine alone would give, i.e. what the server layer costs."""
    import torch

    from model.decoder import BatchDecoder
    from model.hf import load_hf
    from model.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    tokenizer = Tokenizer.load(model_dir)
    decoder = BatchDecoder(load_hf(model_dir), slots=32, prefill_chunk=128, compile=compile)  # compiles here
    queue = [tokenizer.encode(prompts[i % len(prompts)], bos=True) for i in range(requests)]
    tokens, start = 0, time.perf_counter()
    while queue or decoder.running:
        while queue and decoder.has_free_slot():
            decoder.add(queue.pop(), max_tokens, eos_id=tokenizer.eos_id)
        tokens += sum(len(event.tokens) for event in decoder.step())
    seconds = time.perf_counter() - start
    return {"requests": requests, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


# ---------------------------------------------------------------- the prompt cache


def shared_prefix_prompts(vocab: int, context: int, rounds: int) -> list[tuple[list[int], list[int]]]:
    """Per round, two token-id prompts sharing a prefix of ¾ of the context (BOS, then seeded random ids
    that no earlier round shares), each with its own 8-token question."""
    import random

    rng = random.Random(7)
    pairs = []
    for _ in range(rounds):
        prefix = [1] + [rng.randrange(3, vocab) for _ in range(3 * context // 4 - 1)]
        pairs.append(tuple(prefix + [rng.randrange(3, vocab) for _ in range(8)] for _ in range(2)))
    return pairs


def prompt_cache_http(model_dir: Path, work: Path, pairs: list, flags: tuple[str, ...] = ()) -> list[tuple]:
    """Per pair, the latency of a `max_tokens: 1` completion (the time to first token, with the HTTP
    round trip) of the first prompt, then of the second, on one server (8 slots)."""
    import httpx
    from servers import free_port, stop

    port = free_port()
    proc = start_server(model_dir, port, work / f"serve-cache-{model_dir.name}.log", 8, 1, *flags)
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        with httpx.Client(timeout=600) as http:
            def ttft(prompt: list[int]) -> float:
                start = time.perf_counter()
                http.post(url, json={"model": "bench", "prompt": prompt, "max_tokens": 1,
                                     "temperature": 0}).raise_for_status()
                return time.perf_counter() - start

            ttft([1, 5, 6, 7])  # warm-up: first allocations, first connection
            return [(ttft(first), ttft(second)) for first, second in pairs]
    finally:
        stop(proc, grace=60)


def prompt_cache_engine(model_dir: Path, pairs: list, cache: bool = True) -> list[tuple]:
    """The same on the engine alone (8 slots, no HTTP or Ray): `add` to the first token's event."""
    import torch

    from model.decoder import BatchDecoder
    from model.hf import load_hf

    torch.set_num_threads(THREADS)
    decoder = BatchDecoder(load_hf(model_dir), slots=8, prefill_chunk=128, prompt_cache=cache)

    def ttft(prompt: list[int]) -> float:
        start = time.perf_counter()
        decoder.add(prompt, 1, eos_id=None)
        while decoder.running:
            decoder.step()
        return time.perf_counter() - start

    ttft([1, 5, 6, 7])
    return [(ttft(first), ttft(second)) for first, second in pairs]


def prompt_cache(model_dir: Path, work: Path, rounds: int) -> dict:
    """First vs second request's TTFT (medians over `rounds` fresh prefixes), with the cache and, as the
    control, on the engine without it."""
    from statistics import median

    from model.hf import load_hf

    config = load_hf(model_dir).config
    pairs = shared_prefix_prompts(config.vocab_size, config.max_seq_len, rounds)
    result = {"prefix_tokens": 3 * config.max_seq_len // 4, "rounds": rounds}
    for name, times in (("http", prompt_cache_http(model_dir, work, pairs)),
                        ("engine", prompt_cache_engine(model_dir, pairs)),
                        ("engine_without_cache", prompt_cache_engine(model_dir, pairs, cache=False))):
        first, second = median(t for t, _ in times), median(t for _, t in times)
        result[name] = {"first_ttft_ms": round(first * 1000, 1), "second_ttft_ms": round(second * 1000, 1),
                        "ratio": round(first / second, 2)}
        print(f"  prompt cache, {name:20s}: first {result[name]['first_ttft_ms']} ms, second "
              f"{result[name]['second_ttft_ms']} ms: {result[name]['ratio']}x", flush=True)
    return result


# ---------------------------------------------------------------- sequential baselines


def transformers_sequential(model_dir: Path, prompts: list[str], max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from model.tokenizer import Tokenizer

    hf_logging.disable_progress_bar()
    torch.set_num_threads(THREADS)
    tokenizer = Tokenizer.load(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = [torch.tensor([tokenizer.encode(p, bos=True)]) for p in prompts]
    with torch.inference_mode():
        model.generate(ids[0], max_length=ids[0].shape[1] + 4, do_sample=False)
        tokens, start = 0, time.perf_counter()
        for prompt in ids:
            out = model.generate(prompt, max_length=prompt.shape[1] + max_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
            tokens += out.shape[1] - prompt.shape[1]
        seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def export_f16(model_dir: Path, out: Path) -> Path | None:
    try:
        from model.gguf import export_gguf
    except ImportError:
        return None
    export_gguf(model_dir, out, "F16", overwrite=True)
    return out


def llamacpp_sequential(gguf: Path, prompts: list[str], max_tokens: int) -> dict:
    from tasks.quantize.engines import load_llama_cpp

    llm = load_llama_cpp(gguf, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=512, verbose=False)
    llm.create_completion(prompts[0], max_tokens=4, temperature=0)
    tokens, ttft, start = 0, [], time.perf_counter()
    for prompt in prompts:
        sent = time.perf_counter()
        first = None
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
            first = first or time.perf_counter()
            tokens += chunk["choices"][0]["finish_reason"] is None  # one chunk per token, then an empty final one
        ttft.append(first - sent)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_ms": round(percentile(ttft, 0.5) * 1000, 1)}


# ---------------------------------------------------------------- speculative decoding


def speculative(target_dir: Path, draft_dir: Path | None, max_tokens: int, count: int, compile: bool = True) -> dict:
    """One sequence at a time on one thread (a model this small decodes faster on one; both sides alike),
    both sides on the compiled step unless `compile` is off (compiled before the timed rounds)."""
    import torch

    from model.generate import generate, speculative_generate
    from model.hf import load_hf
    from model.speculative import PromptLookup
    from model.tokenizer import Tokenizer

    torch.set_num_threads(1)
    target, tokenizer = load_hf(target_dir), Tokenizer.load(target_dir)
    classes = {"input-grounded": (grounded_prompts(count), PromptLookup(), "prompt lookup")}
    if draft_dir is not None:
        classes["open"] = (OPEN_PROMPTS[:count], load_hf(draft_dir), f"draft model {draft_dir.name}")
    results = {}
    for name, (prompts, drafter, label) in classes.items():
        ids = [tokenizer.encode(p, bos=True) for p in prompts]
        generate(target, ids[0], 2, eos_id=None, compile=compile)  # warm-up: the compiled steps, before timing
        speculative_generate(target, drafter, ids[0], 2, k=4, eos_id=None, compile=compile)
        plain_s, spec_s, stats, same = [], [], {"drafted": 0, "accepted": 0, "target_passes": 0}, True
        for _ in range(2):  # two rounds, alternating, keep each side's faster
            start = time.perf_counter()
            plain = [generate(target, p, max_tokens, eos_id=tokenizer.eos_id, compile=compile) for p in ids]
            plain_s.append(time.perf_counter() - start)
            start, spec = time.perf_counter(), []
            for p in ids:
                one = {}
                spec.append(speculative_generate(target, drafter, p, max_tokens, k=4, eos_id=tokenizer.eos_id,
                                                 stats=one, compile=compile))
                for key in stats:
                    stats[key] += one[key]
            spec_s.append(time.perf_counter() - start)
            same = same and spec == plain
        tokens = sum(len(p) for p in plain)
        results[name] = {"proposer": label, "prompts": len(ids), "tokens": tokens,
                         "plain_tokens_per_s": round(tokens / min(plain_s), 1),
                         "spec_tokens_per_s": round(tokens / min(spec_s), 1),
                         "speedup": round(min(plain_s) / min(spec_s), 2),
                         "acceptance": round(stats["accepted"] / max(1, stats["drafted"]), 3),
                         "tokens_per_target_pass": round(2 * tokens / max(1, stats["target_passes"]), 2),
                         "identical_text": same}
        print(f"  speculative {name:15s} ({label}): {results[name]['speedup']}x, acceptance "
              f"{results[name]['acceptance']}, identical {same}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=Path, default=ROOT / "models" / "pretrain" / "1M",
                        help="the pipeline's tiny milestone dir (default models/pretrain/1M; the prompt-cache "
                             "part alone uses seeded random tiny weights when it is absent)")
    parser.add_argument("--draft", type=Path, default=ROOT / "models" / "pretrain" / "100K",
                        help="the draft model for open prompts (default models/pretrain/100K; absent: skipped)")
    parser.add_argument("--gguf", action="append", default=[], metavar="NAME=FILE",
                        help="F16 GGUF of a model (NAME tiny or 55m) for the llama.cpp baseline")
    parser.add_argument("--models", default="tiny,55m", help="which of tiny,55m to serve (speculative: with tiny)")
    parser.add_argument("--parts", default="throughput,speculative,prompt-cache",
                        help="which of throughput,speculative,prompt-cache to run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="our engine eager (default: on the compiled decode step, as `deploy.compile` serves)")
    parser.add_argument("--work", type=Path, default=RESULTS / "serve-work")
    parser.add_argument("--json", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.tiny / "model.safetensors").is_file():
        if parts != ["prompt-cache"]:
            parser.error(f"--tiny: {args.tiny} is not a model dir (run the pipeline, or pass a milestone dir)")
        args.tiny = tiny_random_dir(args.work)
    ggufs = dict(item.split("=", 1) for item in args.gguf)
    max_tokens = 16 if args.quick else args.max_tokens
    chosen = args.models.split(",")
    models = {"tiny": args.tiny} if "tiny" in chosen else {}
    if "55m" in chosen and LLAMA2_TOKENIZER.is_file():
        models["55m"] = bench_55m_dir(args.work)
    report: dict = {"threads": THREADS, "max_tokens": max_tokens, "compiled": args.compile,
                    "load_before": os.getloadavg(), "models": {}}
    for name, model_dir in models.items():
        prompts = OPEN_PROMPTS
        print(f"{name}: {model_dir}", flush=True)
        entry = report["models"].setdefault(name, {"dir": str(model_dir)})
        if "prompt-cache" in parts:
            entry["prompt_cache"] = prompt_cache(model_dir, args.work, 3 if args.quick else 5)
        if "throughput" not in parts:
            continue
        entry["ours"] = ours(model_dir, prompts, args.work, args.quick, max_tokens, compile=args.compile)
        entry["ours_stream_interval_4"] = ours(model_dir, prompts, args.work, args.quick, max_tokens, 4, args.compile)
        entry["engine_direct_32"] = engine_direct(model_dir, prompts, 32 if args.quick else 64, max_tokens,
                                                  args.compile)
        print(f"  engine alone, 32 slots, no HTTP: {entry['engine_direct_32']['tokens_per_s']} tok/s", flush=True)
        entry["transformers"] = transformers_sequential(model_dir, prompts, max_tokens)
        print(f"  transformers sequential: {entry['transformers']['tokens_per_s']} tok/s", flush=True)
        gguf = Path(ggufs[name]) if name in ggufs else export_f16(model_dir, args.work / f"{name}-f16.gguf")
        if gguf is not None:
            entry["llama_cpp"] = llamacpp_sequential(gguf, prompts, max_tokens)
            print(f"  llama.cpp sequential (F16): {entry['llama_cpp']['tokens_per_s']} tok/s", flush=True)
        else:
            entry["llama_cpp"] = "not measured: no F16 GGUF given (--gguf) and this build has no model/gguf.py"
        by_c = {row["concurrency"]: row["tokens_per_s"] for row in entry["ours"]}
        entry["ratios"] = {"c32_over_c1": round(by_c[32] / by_c[1], 2), "c8_over_c1": round(by_c[8] / by_c[1], 2),
                           "c32_over_transformers": round(by_c[32] / entry["transformers"]["tokens_per_s"], 2),
                           "c1_over_transformers": round(by_c[1] / entry["transformers"]["tokens_per_s"], 2),
                           "c32_over_engine_alone": round(by_c[32] / entry["engine_direct_32"]["tokens_per_s"], 2)}
        by_c4 = {row["concurrency"]: row["tokens_per_s"] for row in entry["ours_stream_interval_4"]}
        entry["ratios"]["interval4_c32_over_c1"] = round(by_c4[32] / by_c4[1], 2)
        if isinstance(entry["llama_cpp"], dict):
            entry["ratios"]["c32_over_llama_cpp"] = round(by_c[32] / entry["llama_cpp"]["tokens_per_s"], 2)
            entry["ratios"]["interval4_c32_over_llama_cpp"] = round(by_c4[32] / entry["llama_cpp"]["tokens_per_s"], 2)
    if "tiny" in chosen and "speculative" in parts:
        draft = args.draft if (args.draft / "model.safetensors").is_file() else None
        report["speculative"] = speculative(args.tiny, draft, max_tokens, 4 if args.quick else 16, args.compile)
    report["load_after"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: {part: v[part] for part in ("ratios", "prompt_cache") if part in v}
                      for k, v in report["models"].items()}, indent=2))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
