"""Decoding with a KV cache: sampling (temperature, top-k, top-p), streaming, speculative decoding.

Works on token ids only (the tokenizer is the caller's business), one sequence at a time.
`generate_stream` yields each token as soon as it is final, which is what a streaming HTTP
endpoint needs; `generate` collects it. Stop sequences are held back while they might still
be forming, so a streamed stop sequence never leaks into the output.

`speculative_generate` drafts `k` tokens with a small model and verifies them with the target
in one forward pass. Greedy only, and exact: its output is the target's greedy output, token
for token; the draft only changes how many target passes that takes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from model.llama import KVCache, Llama


def _check_prompt(model: Llama, prompt_ids: Sequence[int]) -> list[int]:
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("prompt_ids: empty prompt (start it with BOS)")
    vocab = model.config.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt_ids: token id {bad[0]} outside the vocabulary (size {vocab})")
    if len(prompt) >= model.config.max_seq_len:
        raise ValueError(f"prompt_ids: {len(prompt)} tokens leave no room in max_seq_len={model.config.max_seq_len}")
    return prompt


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k: must be >= 0 (0 = off), got {top_k}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> int:
    """One token id from a (vocab,) logits row: argmax at temperature 0, else nucleus/top-k sampling."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class _StopFilter:
    """Turns raw generated ids into final ones: ends at EOS or a stop sequence, holding back a tail
    that could still become a stop sequence so it is never emitted and then retracted."""

    def __init__(self, eos_id: int | None, stop: Sequence[Sequence[int]] | None):
        self.eos_id = eos_id
        self.stop = [list(s) for s in (stop or []) if len(s)]
        self.pending: list[int] = []
        self.done = False

    def push(self, token: int) -> list[int]:
        if token == self.eos_id:
            self.done = True
            return self.flush()
        self.pending.append(token)
        for seq in self.stop:
            if self.pending[-len(seq):] == seq:
                self.done = True
                out, self.pending = self.pending[:-len(seq)], []
                return out
        keep = max((n for seq in self.stop for n in range(1, len(seq)) if self.pending[-n:] == seq[:n]), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> list[int]:
        out, self.pending = self.pending, []
        return out


def _last_logits(model: Llama, tokens: list[int], pos: int, cache: KVCache) -> torch.Tensor:
    """Feed `tokens` at `pos`; logits of the last position only (a long prompt's other rows are never projected)."""
    idx = torch.tensor([tokens], device=model.lm_head.weight.device)
    return model.lm_head(model.hidden_states(idx, pos, cache)[0, -1])


@torch.inference_mode()
def generate_stream(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, seed: int | None = None, eos_id: int | None = 2,
                    stop: Sequence[Sequence[int]] | None = None) -> Iterator[int]:
    """Yield new token ids one by one (prompt excluded), stopping at EOS (not yielded), at a stop
    sequence (not yielded), after `max_new_tokens`, or when the context is full."""
    prompt = _check_prompt(model, prompt_ids)
    _check_sampling(max_new_tokens, temperature, top_p, top_k)
    if max_new_tokens == 0:
        return
    device = model.lm_head.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    budget = min(max_new_tokens, model.config.max_seq_len - len(prompt))
    cache = model.new_cache(1, len(prompt) + budget)
    filt = _StopFilter(eos_id, stop)
    logits = _last_logits(model, prompt, 0, cache)
    pos = len(prompt)
    for i in range(budget):
        token = sample(logits, temperature, top_p, top_k, generator)
        yield from filt.push(token)
        if filt.done:
            return
        if i + 1 < budget:
            logits = _last_logits(model, [token], pos, cache)
            pos += 1
    yield from filt.flush()


def generate(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, eos_id: int | None = 2,
             stop: Sequence[Sequence[int]] | None = None) -> list[int]:
    """The new token ids `generate_stream` yields, as a list."""
    return list(generate_stream(model, prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, eos_id, stop))


class _Cached:
    """A model, its KV cache, and how many leading tokens of the sequence the cache holds."""

    def __init__(self, model: Llama, max_len: int):
        self.model = model
        self.cache: KVCache = model.new_cache(1, max_len)
        self.filled = 0

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Feed the tokens the cache lacks; (fed, vocab) logits, the last row predicting what follows `tokens`."""
        device = self.model.lm_head.weight.device
        out = self.model(torch.tensor([tokens[self.filled:]], device=device), self.filled, self.cache)[0]
        self.filled = len(tokens)
        return out

    def rollback(self, length: int) -> None:
        """Forget everything past `length` tokens (rejected guesses); their slots are simply rewritten later."""
        self.filled = min(self.filled, length)


@torch.inference_mode()
def speculative_stream(target: Llama, draft: Llama, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                       k: int = 4, eos_id: int | None = 2, stop: Sequence[Sequence[int]] | None = None,
                       stats: dict | None = None) -> Iterator[int]:
    """Greedy speculative decoding; yields exactly what `generate_stream(target, ..., temperature=0)` yields.

    Each round: the draft proposes up to `k` greedy tokens; the target scores them all in one pass and
    keeps the longest prefix it agrees with, plus its own next token. `stats` (if given) receives
    `target_passes`, `drafted` and `accepted` counts.
    """
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocab_size: {draft.config.vocab_size} differs from the target's "
                         f"{target.config.vocab_size}")
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    prompt = _check_prompt(target, prompt_ids)
    _check_prompt(draft, prompt_ids)
    _check_sampling(max_new_tokens, 0.0, 1.0, 0)
    counts = stats if stats is not None else {}
    counts.update(target_passes=0, drafted=0, accepted=0)
    limit = min(target.config.max_seq_len, draft.config.max_seq_len)
    budget = min(max_new_tokens, limit - len(prompt))
    if budget <= 0:
        return
    big, small = _Cached(target, len(prompt) + budget), _Cached(draft, len(prompt) + budget)
    filt = _StopFilter(eos_id, stop)
    seq = list(prompt)
    verified = [int(torch.argmax(big.logits(seq)[-1]))]  # target-greedy tokens not yet emitted
    counts["target_passes"] += 1
    while True:
        for token in verified:
            seq.append(token)
            yield from filt.push(token)
            if filt.done or len(seq) - len(prompt) == budget:
                yield from filt.flush()
                return
        # Both caches now hold at most seq[:-1]: the last verified token was never fed to either,
        # and slots past it (rejected guesses) are overwritten by the next feed.
        big.rollback(len(seq) - 1)
        small.rollback(len(seq) - 1)
        guesses: list[int] = []
        for _ in range(min(k, budget - (len(seq) - len(prompt)))):
            guesses.append(int(torch.argmax(small.logits(seq + guesses)[-1])))
        verdict = big.logits(seq + guesses)[-(len(guesses) + 1):].argmax(-1).tolist()
        accepted = 0
        while accepted < len(guesses) and guesses[accepted] == verdict[accepted]:
            accepted += 1
        counts["target_passes"] += 1
        counts["drafted"] += len(guesses)
        counts["accepted"] += accepted
        verified = guesses[:accepted] + [verdict[accepted]]


def speculative_generate(target: Llama, draft: Llama, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                         k: int = 4, eos_id: int | None = 2, stop: Sequence[Sequence[int]] | None = None,
                         stats: dict | None = None) -> list[int]:
    """The new token ids `speculative_stream` yields, as a list."""
    return list(speculative_stream(target, draft, prompt_ids, max_new_tokens, k, eos_id, stop, stats))
