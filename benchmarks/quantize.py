"""Decode speed at batch 1: our engine in fp32 and int8 (compiled and eager) vs llama.cpp on F32, F16, Q8_0, Q4_0.

Why it is built this way: the machine is shared and noisy, so every contender decodes the same
prompt from the same weights in one process, round-robin (the first contender rotates each round),
and ratios are taken within a round before the median is reported. Weights are random (speed does
not depend on them); each model is written as an HF dir once and exported to GGUF with
model/gguf.py, so llama.cpp runs exactly the files the quantize stage makes. Decode tokens/s counts
the tokens after the first one (the first includes the prompt's prefill), greedy, no EOS stop.
Our compiled contenders decode on model/step.py's compiled step, compiled before the rounds (its
time is reported as `compile_s`); "eager" ones are the same engine with `compile=False`.

Roofline: at batch 1 a decode step reads every weight once, so bytes of weights per token (the
embedding row aside) ÷ the copy bandwidth measured on this machine in the same run is the
memory-bound ceiling in tokens/s; each contender's fraction of it is reported.

    .venv/bin/python benchmarks/quantize.py            # tiny preset and bench-55m, 5 rounds × 64 tokens
    .venv/bin/python benchmarks/quantize.py --quick    # smoke run: 2 rounds × 16 tokens
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import preset  # noqa: E402
from model.generate import generate_stream  # noqa: E402
from model.gguf import export_gguf  # noqa: E402
from model.hf import load_hf, save_hf  # noqa: E402
from model.llama import Llama  # noqa: E402
from model.quant import quantize_int8  # noqa: E402
from tasks.files import write_json_atomic  # noqa: E402

CONFIGS = {"tiny": lambda: preset("tiny"), "bench-55m": lambda: preset("bench-55m")}
GGUF_CONTENDERS = ("F32", "F16", "Q8_0", "Q4_0")
OURS = ("fp32", "fp32 eager", "int8", "int8 eager")
# (numerator, denominator) -> target (None: reported only), per config
RATIOS = {("int8", "fp32"): None, ("fp32", "fp32 eager"): {"tiny": 2.0, "bench-55m": 1.3},
          ("int8", "int8 eager"): None, ("fp32", "llama.cpp F32"): {"bench-55m": 0.8},
          ("fp32", "llama.cpp F16"): {"tiny": 0.5}, ("int8", "llama.cpp Q8_0"): {"bench-55m": 0.8},
          ("int8", "llama.cpp Q4_0"): None}
BYTES_PER_WEIGHT = {"F32": 4.0, "F16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}  # llama.cpp's block layouts


def copy_bandwidth(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write), best of `repeats`: the machine's memory bandwidth."""
    torch.set_num_threads(threads)
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def weight_bytes(model: Llama, contender: str) -> float:
    """Bytes of weights one decode step reads (everything but the embedding table, of which it reads a row)."""
    if contender.startswith("llama.cpp"):
        matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
        vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
        return matrices * BYTES_PER_WEIGHT[contender.split()[-1]] + vectors * 4
    tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()]
               if "embed" not in n and "rope" not in n]
    return float(sum(t.numel() * t.element_size() for t in tensors))


def synthetic_tokenizer(vocab_size: int) -> bytes:
    """A Llama-2-shaped SentencePiece model (unk/bos/eos, 256 byte pieces, then plain pieces) of any
    size, so a random-weight model of any vocab can be written as a complete HF dir and a GGUF."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    spec = proto.trainer_spec
    spec.model_type, spec.byte_fallback, spec.vocab_size = pb.TrainerSpec.BPE, True, vocab_size
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    proto.normalizer_spec.name, proto.normalizer_spec.add_dummy_prefix = "identity", True
    proto.normalizer_spec.remove_extra_whitespaces = False
    pieces = [("<unk>", pb.ModelProto.SentencePiece.UNKNOWN), ("<s>", pb.ModelProto.SentencePiece.CONTROL),
              ("</s>", pb.ModelProto.SentencePiece.CONTROL)]
    pieces += [(f"<0x{b:02X}>", pb.ModelProto.SentencePiece.BYTE) for b in range(256)]
    pieces += [(f"▁t{i}", pb.ModelProto.SentencePiece.NORMAL) for i in range(vocab_size - len(pieces))]
    for i, (text, kind) in enumerate(pieces):
        proto.pieces.add(piece=text, score=-float(i), type=kind)
    return proto.SerializeToString()


def build(name: str, workdir: Path, threads: int) -> dict:
    """The five contenders of one config, from one set of random weights."""
    from model.tokenizer import save_tokenizer_dir
    from tasks.quantize.engines import load_llama_cpp

    config = CONFIGS[name]()
    torch.manual_seed(0)
    tokenizer_dir = save_tokenizer_dir(synthetic_tokenizer(config.vocab_size), workdir / f"{name}-tokenizer")
    hf_dir = save_hf(Llama(config), workdir / name, tokenizer_dir=tokenizer_dir)
    fp32, int8 = load_hf(hf_dir), quantize_int8(load_hf(hf_dir))
    contenders = {"fp32": fp32, "fp32 eager": fp32, "int8": int8, "int8 eager": int8}
    for qtype in GGUF_CONTENDERS:
        path = export_gguf(hf_dir, workdir / f"{name}-{qtype}.gguf", qtype).path
        contenders[f"llama.cpp {qtype}"] = load_llama_cpp(path, n_ctx=config.max_seq_len, n_threads=threads,
                                                          n_threads_batch=threads, verbose=False)
    return contenders


def decode_tokens_per_s(engine, prompt: list[int], new_tokens: int, compiled: bool = False) -> float:
    """Greedy decode of `new_tokens`; tokens/s over all but the first (which pays for the prefill)."""
    if isinstance(engine, Llama):
        stream = generate_stream(engine, prompt, max_new_tokens=new_tokens, eos_id=None, compile=compiled)
    else:
        stream = engine.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
    stamps = []
    for _ in range(new_tokens):
        next(stream)
        stamps.append(time.perf_counter())
    stream.close()
    return (new_tokens - 1) / (stamps[-1] - stamps[0])


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "prompt_tokens": args.prompt_tokens, "configs": {}, "copy_bandwidth_gb_s": []}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as workdir:
        for name in args.configs:
            contenders = build(name, Path(workdir), args.threads)
            prompt = [1] + [(7 * i) % 250 + 3 for i in range(args.prompt_tokens - 1)]
            compile_s = {}
            for contender, engine in contenders.items():  # warm-up: compiles, allocates caches and threads
                start = time.perf_counter()
                decode_tokens_per_s(engine, prompt, 4, contender in ("fp32", "int8"))
                compile_s[contender] = round(time.perf_counter() - start, 1)
            speeds = {c: [] for c in contenders}
            bandwidths = []
            for round_index in range(args.rounds):
                bandwidths.append(copy_bandwidth(args.threads))
                order = (list(contenders)[round_index % len(contenders):]
                         + list(contenders)[:round_index % len(contenders)])
                for contender in order:
                    speeds[contender].append(decode_tokens_per_s(contenders[contender], prompt, args.new_tokens,
                                                                 contender in ("fp32", "int8")))
                print(f"{name} round {round_index + 1}: " + ", ".join(f"{c} {speeds[c][-1]:.1f}" for c in contenders),
                      flush=True)
            ratios = {f"{a} / {b}": statistics.median(x / y for x, y in zip(speeds[a], speeds[b])) for a, b in RATIOS}
            targets = {f"{a} / {b}": t[name] for (a, b), t in RATIOS.items() if t and name in t}
            bandwidth = statistics.median(bandwidths)
            # llama.cpp's bytes come from the fp32 model's shapes and the GGUF type's block layout
            roofline = {c: bandwidth / weight_bytes(contenders["int8" if c.startswith("int8") else "fp32"], c)
                        for c in contenders}
            fractions = {c: statistics.median(speeds[c]) / roofline[c] for c in contenders}
            result["copy_bandwidth_gb_s"].append(bandwidth / 1e9)
            result["configs"][name] = {"tokens_per_s": {c: statistics.median(v) for c, v in speeds.items()},
                                       "rounds": speeds, "ratios": ratios, "targets": targets,
                                       "roofline_tokens_per_s": roofline, "roofline_fraction": fractions,
                                       "warm_up_s": compile_s}
            for engine in contenders.values():
                if hasattr(engine, "close"):
                    engine.close()
    return result


def report(result: dict) -> str:
    lines = [f"decode tok/s at batch 1, median of {result['rounds']} rounds, {result['new_tokens']} new tokens after "
             f"a {result['prompt_tokens']}-token prompt, {result['threads']} threads; copy bandwidth "
             + ", ".join(f"{b:.1f}" for b in result["copy_bandwidth_gb_s"]) + " GB/s"]
    for name, entry in result["configs"].items():
        lines.append(f"\n{name}: warm-up (compile) s " + ", ".join(f"{c} {v}" for c, v in entry["warm_up_s"].items()))
        for c, v in entry["tokens_per_s"].items():
            lines.append(f"  {c:<16} {v:8.1f} tok/s  roofline {entry['roofline_tokens_per_s'][c]:8.1f}  "
                         f"fraction {entry['roofline_fraction'][c]:.2f}")
        for label, value in entry["ratios"].items():
            target = entry["targets"].get(label)
            mark = "" if target is None else f"  (target ≥ {target}×: " + ("met" if value >= target else "MISSED") + ")"
            lines.append(f"  {label:<28} {value:.2f}×{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 16 tokens")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "quantize.json")
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown config {unknown[0]!r} (known: {', '.join(CONFIGS)})")
    if args.quick:
        args.rounds, args.new_tokens = 2, 16
    result = run(args)
    print(report(result))
    print(f"wrote {write_json_atomic(args.json, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
