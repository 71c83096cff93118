"""Decoding one sequence: sampling (temperature, top-k, top-p), streaming, speculative decoding.

Works on token ids only (the tokenizer is the caller's business). These are the one-sequence
entry points over the batched decoder (model/decoder.py), so a script, `tinyllama generate` and
the server decode with the same code. `generate_stream` yields each token as soon as it is final,
which is what a streaming HTTP endpoint needs; `generate` collects it. Stop sequences are held back
while they might still be forming (model/stops.py), so a streamed stop sequence never leaks into the output.

`speculative_generate` drafts `k` tokens with a small model, or by prompt lookup (`PromptLookup()`
as the draft), and verifies them with the target in one forward pass. Greedy, it is exact: its output
is the target's greedy output, token for token; sampling, it uses the rejection scheme, whose
output is distributed as the target's own samples. The draft only changes how many target passes it takes.

`compile=True` decodes on the compiled step (model/step.py) of one persistent one-sequence decoder per
(model, draft, k), built at the model's whole context and compiled on first use (`warm_up` does that
at load, so the first request does not pay for it); eager calls build a decoder per call, sized to it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

import torch

from model.decoder import BatchDecoder, check_prompt
from model.llama import Llama
from model.sampling import Sampling, pick, probabilities
from model.speculative import PromptLookup
from model.stops import StopFilter


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> int:
    """One token id from a (vocab,) logits row: argmax at temperature 0, else nucleus/top-k sampling."""
    setting = Sampling(temperature, top_p, top_k)
    if generator is None and not setting.greedy:
        generator = setting.generator(logits.device)
    return pick(probabilities(logits[None], [setting])[0], setting, generator)


def _decode_one(decoder: BatchDecoder, prompt: list[int], max_new_tokens: int, sampling: Sampling,
                eos_id: int | None, stop: Sequence[Sequence[int]] | None) -> Iterator[int]:
    seq = decoder.add(prompt, max_new_tokens, sampling, eos_id)
    filt = StopFilter(stop)
    try:
        while True:
            for event in decoder.step():
                yield from filt.push(event.tokens)
                if filt.done:
                    return
                if event.finish is not None:
                    yield from filt.flush()
                    return
    finally:
        decoder.cancel(seq)


_COMPILED: weakref.WeakKeyDictionary[Llama, dict] = weakref.WeakKeyDictionary()


def warm_up(model: Llama, draft: Llama | PromptLookup | None = None, k: int = 4) -> BatchDecoder:
    """The compiled one-sequence decoder of `model` (with `draft` and `k`), compiling it on first call."""
    decoders = _COMPILED.setdefault(model, {})
    key = (type(draft).__name__, id(draft) if isinstance(draft, Llama) else vars(draft) if draft else None, k)
    key = repr(key)
    if key not in decoders:
        limit = model.config.max_seq_len if not isinstance(draft, Llama) else min(model.config.max_seq_len,
                                                                                   draft.config.max_seq_len)
        prefill = limit - 1  # a prompt is prefilled in one chunk, as an eager call does
        decoders[key] = BatchDecoder(model, slots=1, prefill_chunk=prefill, draft=draft, k=k, compile=True)
    return decoders[key]


def _budget(limit: int, prompt: list[int], max_new_tokens: int) -> int:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    return min(max_new_tokens, limit - len(prompt))


def generate_stream(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, seed: int | None = None, eos_id: int | None = 2,
                    stop: Sequence[Sequence[int]] | None = None, compile: bool = False) -> Iterator[int]:
    """Yield new token ids one by one (prompt excluded), stopping at EOS (not yielded), at a stop
    sequence (not yielded), after `max_new_tokens`, or when the context is full."""
    prompt = check_prompt(prompt_ids, model.config.vocab_size, model.config.max_seq_len)
    sampling = Sampling(temperature, top_p, top_k, seed)
    budget = _budget(model.config.max_seq_len, prompt, max_new_tokens)
    if budget == 0:
        return
    if compile:
        decoder = warm_up(model)
    else:
        decoder = BatchDecoder(model, slots=1, max_len=len(prompt) + budget, prefill_chunk=len(prompt))
    yield from _decode_one(decoder, prompt, budget, sampling, eos_id, stop)


def generate(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, eos_id: int | None = 2,
             stop: Sequence[Sequence[int]] | None = None, compile: bool = False) -> list[int]:
    """The new token ids `generate_stream` yields, as a list."""
    return list(generate_stream(model, prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, eos_id, stop,
                                compile))


def speculative_stream(target: Llama, draft: Llama | PromptLookup, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                       k: int = 4, eos_id: int | None = 2, stop: Sequence[Sequence[int]] | None = None,
                       stats: dict | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       seed: int | None = None, compile: bool = False) -> Iterator[int]:
    """Speculative decoding; greedy (the default), yields exactly what `generate_stream(target, ...,
    temperature=0)` yields.

    Each round the draft (a smaller Llama with the same vocabulary, or `PromptLookup()`) proposes up
    to `k` tokens; the target scores them all in one pass and keeps those the rejection scheme
    accepts (greedy: the longest prefix it agrees with), plus one token of its own. `stats` (if
    given) receives `target_passes`, `drafted` and `accepted` counts.
    """
    limit = target.config.max_seq_len
    if isinstance(draft, Llama):
        limit = min(limit, draft.config.max_seq_len)
    prompt = check_prompt(prompt_ids, target.config.vocab_size, limit)
    sampling = Sampling(temperature, top_p, top_k, seed)
    budget = _budget(limit, prompt, max_new_tokens)
    if compile:
        decoder = warm_up(target, draft, k)
    else:
        decoder = BatchDecoder(target, slots=1, max_len=len(prompt) + budget + 1, prefill_chunk=len(prompt),
                               draft=draft, k=k)
    before = dict(decoder.stats)
    counts = stats if stats is not None else {}
    try:
        if budget > 0:
            yield from _decode_one(decoder, prompt, budget, sampling, eos_id, stop)
    finally:
        counts.update({name: value - before[name] for name, value in decoder.stats.items()})


def speculative_generate(target: Llama, draft: Llama | PromptLookup, prompt_ids: Sequence[int],
                         max_new_tokens: int = 64, k: int = 4, eos_id: int | None = 2,
                         stop: Sequence[Sequence[int]] | None = None, stats: dict | None = None,
                         **sampling) -> list[int]:
    """The new token ids `speculative_stream` yields, as a list."""
    return list(speculative_stream(target, draft, prompt_ids, max_new_tokens, k, eos_id, stop, stats, **sampling))
