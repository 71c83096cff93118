"""Decoding on one GPU: our compiled engine against transformers' compiled static-cache `generate`, and each
against the memory-bandwidth roofline, on random bf16 weights (issue 22's GPU figures).

  python benchmarks/gpu_decode.py                        # parts a, b, c on CUDA
  python benchmarks/gpu_decode.py --parts a,c --tokens 128
  python benchmarks/gpu_decode.py --device cpu --smoke   # the same code at toy sizes on CPU: checks the script

Parts:
  a  the 1.1B preset at batch 1: ours (model/step.py's compiled step, CUDA graphs) against transformers
     (`cache_implementation="static"`, which it compiles itself with mode="reduce-overhead"); ratio of decode
     tokens/s (target >= 1.3) and each one's fraction of the roofline.
  b  a Llama-2-7B-shaped config (32 layers, hidden 4096, 32 heads, MLP 11008) at batch 1, bf16 and int8
     weight-only (model/quant.py): our fraction of the roofline (target >= 0.6; gpt-fast reports ~0.7 for
     Llama-2-7B on an A100).
  c  the 1.1B preset, 32 sequences at once: ours (`BatchDecoder`, 32 slots) against transformers' batched
     `generate` with the same static cache; ratio of aggregate decode tokens/s (target >= 2).

Roofline: the bytes of weights a decode step reads (all but the embedding table, of which it reads rows)
÷ the device's copy bandwidth, measured in the same run. Decode tokens/s leaves the prefill out: at batch 1
(tokens − 1) ÷ (time of the last token − time of the first); for 32 sequences 32 × (N − 1) ÷ (time to N
tokens − time to 1 token). Every contender is warmed up (compiled) before its timed rounds, and rounds
alternate the contenders. Needs torch, safetensors, tokenizers and transformers; not Ray, not llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.config import LlamaConfig, preset  # noqa: E402
from model.decoder import BatchDecoder  # noqa: E402
from model.hf import config_to_hf, to_hf_state_dict  # noqa: E402
from model.llama import Llama  # noqa: E402
from model.quant import quantize_int8  # noqa: E402

LLAMA_7B = LlamaConfig(n_layer=32, n_head=32, n_kv_head=32, dim=4096, mlp_dim=11008, vocab_size=32000,
                       max_seq_len=2048)
SMOKE_7B = preset("bench-55m")  # part b's shape under --smoke
TARGETS = {"a": 1.3, "b": 0.6, "c": 2.0}
PROMPT_TOKENS = 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes/s moved by a large on-device copy (read + write), best of `repeats`."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def random_model(config: LlamaConfig, dtype: torch.dtype, device: torch.device) -> Llama:
    """Random weights made on the device (a 7B model in fp32 on the host would take minutes and 28 GB)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(config)
    model = model.to_empty(device=device).to(dtype)
    model.reset_parameters()  # RoPE tables in fp32, as load_hf leaves them
    return model.eval()


def step_weight_bytes(model: Llama) -> float:
    """Bytes of weights one decode step reads: everything but the embedding table and the RoPE tables."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return float(sum(t.numel() * t.element_size() for n, t in named if "embed" not in n and "rope" not in n))


def transformers_copy(model: Llama, dtype: torch.dtype, device: torch.device):
    """transformers' `LlamaForCausalLM` with our weights (SDPA attention, its default)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    with torch.device(device):
        hf = LlamaForCausalLM._from_config(HFConfig.from_dict(config_to_hf(model.config, dtype)), dtype=dtype)
    hf.load_state_dict(to_hf_state_dict(model))
    return hf.eval()


def prompts(config: LlamaConfig, count: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, config.vocab_size, (count, length), generator=generator).tolist()


def decoder_for(model: Llama, slots: int, tokens: int) -> BatchDecoder:
    """Our compiled engine with a cache as long as a prompt and its `tokens`, as transformers' static cache is
    sized: on CUDA a step attends over a length bucket of it (model/step.py), at these sizes 64, 128 or all of it."""
    return BatchDecoder(model, slots=slots, max_len=PROMPT_TOKENS + tokens, prefill_chunk=PROMPT_TOKENS, compile=True,
                        prompt_cache=False)


def ours_batch1(decoder: BatchDecoder, prompt: list[int], tokens: int) -> float:
    """Decode tokens/s of one sequence on `decoder` (each step emits one token once the prompt is in)."""
    stamps = []
    decoder.add(prompt, tokens, eos_id=None)
    while decoder.running:
        stamps += [time.perf_counter() for event in decoder.step() for _ in event.tokens]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


class _Stamps:
    """A transformers streamer that times each new token (the first `put` is the prompt)."""

    def __init__(self):
        self.calls: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        value.cpu()  # the token is on the host, as ours are when we stamp them
        self.calls.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(hf, ids: torch.Tensor, tokens: int, streamer=None) -> None:
    """transformers' compiled static-cache decoding; `dynamic=False`: one static graph per shape, as ours (its
    default lets Dynamo make the cache length dynamic once a second length comes)."""
    from transformers import CompileConfig

    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                do_sample=False, cache_implementation="static", eos_token_id=None, pad_token_id=0, streamer=streamer,
                compile_config=CompileConfig(dynamic=False))


def transformers_batch1(hf, prompt: list[int], tokens: int) -> float:
    streamer = _Stamps()
    _hf_generate(hf, torch.tensor([prompt], device=hf.device), tokens, streamer)
    new = streamer.calls[1:]
    return (len(new) - 1) / (new[-1] - new[0])


def timed(run, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def ours_batched(decoder: BatchDecoder, batch: list[list[int]], tokens: int) -> float:
    """Seconds to take every prompt of `batch` to `tokens` new tokens on `decoder` (all added at once)."""
    def run():
        for prompt in batch:
            decoder.add(prompt, tokens, eos_id=None)
        while decoder.running:
            decoder.step()
    return timed(run, decoder.device)


def transformers_batched(hf, batch: list[list[int]], tokens: int) -> float:
    ids = torch.tensor(batch, device=hf.device)
    return timed(lambda: _hf_generate(hf, ids, tokens), hf.device)


def rounds_of(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Each contender's measure per round, the first contender rotating each round."""
    names, results = list(contenders), {name: [] for name in contenders}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(contenders[name]())
    return results


def part_a(config, dtype, device, tokens, rounds, bandwidth) -> dict:
    model = random_model(config, dtype, device)
    hf = transformers_copy(model, dtype, device)
    prompt = prompts(config, 1, PROMPT_TOKENS)[0]
    decoder = decoder_for(model, 1, tokens)
    ours_batch1(decoder, prompt, tokens)  # warm-ups at the timed length: the same cache and graphs as the rounds
    transformers_batch1(hf, prompt, tokens)  # transformers compiles its forward on the first static-cache call
    measured = rounds_of({"ours": lambda: ours_batch1(decoder, prompt, tokens),
                          "transformers": lambda: transformers_batch1(hf, prompt, tokens)}, rounds)
    roofline = bandwidth / step_weight_bytes(model)
    rates = {name: statistics.median(values) for name, values in measured.items()}
    ratio = statistics.median(o / t for o, t in zip(measured["ours"], measured["transformers"]))
    return {"tokens_per_s": {k: round(v, 1) for k, v in rates.items()}, "roofline_tokens_per_s": round(roofline, 1),
            "fraction_of_roofline": {k: round(v / roofline, 3) for k, v in rates.items()},
            "ours_over_transformers": round(ratio, 3), "target": TARGETS["a"], "met": ratio >= TARGETS["a"]}


def part_b(config, dtype, device, tokens, rounds, bandwidth) -> dict:
    prompt = prompts(config, 1, PROMPT_TOKENS)[0]
    result = {}
    for name in (str(dtype).removeprefix("torch.").replace("bfloat", "bf").replace("float", "fp"), "int8"):
        model = random_model(config, dtype, device)
        if name == "int8":
            model = quantize_int8(model)
        roofline = bandwidth / step_weight_bytes(model)
        try:
            decoder = decoder_for(model, 1, tokens)
            rates = [ours_batch1(decoder, prompt, tokens) for _ in range(rounds + 1)][1:]  # the first warms up
            del decoder
        except Exception as exc:  # e.g. a torch without a CUDA int8 weight-only kernel: report, go on
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rate = statistics.median(rates)
        result[name] = {"tokens_per_s": round(rate, 1), "roofline_tokens_per_s": round(roofline, 1),
                        "fraction_of_roofline": round(rate / roofline, 3), "target": TARGETS["b"],
                        "met": rate / roofline >= TARGETS["b"]}
    return result


def part_c(config, dtype, device, tokens, rounds, sequences) -> dict:
    model = random_model(config, dtype, device)
    hf = transformers_copy(model, dtype, device)
    batch = prompts(config, sequences, PROMPT_TOKENS)
    decoder = decoder_for(model, sequences, tokens)
    for contender in (lambda n: ours_batched(decoder, batch, n), lambda n: transformers_batched(hf, batch, n)):
        contender(tokens), contender(1)  # warm-up: compiles both lengths' paths

    def rate(contender) -> float:
        return sequences * (tokens - 1) / (contender(tokens) - contender(1))

    measured = rounds_of({"ours": lambda: rate(lambda n: ours_batched(decoder, batch, n)),
                          "transformers": lambda: rate(lambda n: transformers_batched(hf, batch, n))}, rounds)
    ratio = statistics.median(o / t for o, t in zip(measured["ours"], measured["transformers"]))
    return {"sequences": sequences, "tokens_per_s": {k: round(statistics.median(v), 1) for k, v in measured.items()},
            "ours_over_transformers": round(ratio, 3), "target": TARGETS["c"], "met": ratio >= TARGETS["c"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per sequence")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="toy sizes (tiny for 1.1B, 55M for 7B), fp32, 4 rows")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "gpu_decode.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    small, large = (preset("tiny"), SMOKE_7B) if args.smoke else (preset("tinyllama-1.1b"), LLAMA_7B)
    bandwidth = copy_bandwidth(device, 64 if args.smoke else 1024)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "tokens": args.tokens, "rounds": args.rounds,
              "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1)}
    print(json.dumps(result), flush=True)
    with torch.inference_mode():
        for part in args.parts.split(","):
            started = time.perf_counter()
            if part == "a":
                result["a"] = part_a(small, dtype, device, args.tokens, args.rounds, bandwidth)
            elif part == "b":
                result["b"] = part_b(large, dtype, device, args.tokens, args.rounds, bandwidth)
            elif part == "c":
                result["c"] = part_c(small, dtype, device, args.tokens, args.rounds, 4 if args.smoke else 32)
            else:
                parser.error(f"--parts: unknown part {part!r} (a, b, c)")
            result[part]["wall_s"] = round(time.perf_counter() - started, 1)
            print(json.dumps({part: result[part]}), flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
