"""The prompt cache (model/decoder.py): a request whose prompt starts with tokens a free slot's cache still
holds prefills only the rest, and emits exactly what it would without the cache: the same tokens and
log-probabilities (within 1e-5: a prefix computed in another forward differs in the last bits at most),
greedy, sampled, penalized and speculative; partial, full-prompt and generated-token prefixes; a prompt
that shares nothing evicts the least recently used slot. (The compiled step: tests/test_compiled_step.py.)"""

from __future__ import annotations

import pytest
import torch
from test_serving_math import REPETITIVE

from model.decoder import GREEDY, BatchDecoder
from model.generate import generate
from model.sampling import Sampling
from model.speculative import PromptLookup

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(300)]

ATOL = 1e-5
PREFIX = [1, *range(100, 140)]  # a shared "system prompt" of 41 tokens
A, B = PREFIX + [7, 8, 9], PREFIX + [50, 51]
OTHER = [1, 300, 301, 302]
SETTINGS = [Sampling(logprobs=2), Sampling(temperature=0.8, top_p=0.9, seed=4, logprobs=1),
            Sampling(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, logprobs=0)]


def serve(decoder: BatchDecoder, prompt: list[int], n: int, sampling: Sampling = GREEDY) -> dict:
    """One request alone to its end: its tokens, logprobs, prompt logprobs, cached prompt tokens and slot."""
    seq_id = decoder.add(prompt, n, sampling, eos_id=None)
    out = {"tokens": [], "logprobs": [], "prompt_logprobs": None, "cached": 0,
           "slot": decoder.running[seq_id].slot}
    while decoder.running:
        for event in decoder.step():
            out["tokens"] += event.tokens
            out["logprobs"] += event.logprobs
            out["cached"] += event.cached
            if event.prompt_logprobs is not None:
                out["prompt_logprobs"] = event.prompt_logprobs
    return out


def assert_logprobs_close(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.token == w.token and abs(g.logprob - w.logprob) <= ATOL
        assert [t for t, _ in g.top] == [t for t, _ in w.top]
        assert all(abs(a - b) <= ATOL for (_, a), (_, b) in zip(g.top, w.top))


def conversation(decoder: BatchDecoder, sampling: Sampling) -> list[dict]:
    """A chat's requests in turn: a prompt, the same prompt again, the prompt followed by its answer and a
    new turn (a prefix that includes generated tokens), one sharing its first 41 tokens, one sharing nothing."""
    first = serve(decoder, A, 8, sampling)
    return [first, serve(decoder, A, 8, sampling), serve(decoder, A + first["tokens"] + [60, 61], 8, sampling),
            serve(decoder, B, 8, sampling), serve(decoder, OTHER, 8, sampling)]


@pytest.mark.parametrize("sampling", SETTINGS, ids=["greedy", "sampled", "penalized"])
def test_reused_prefixes_emit_what_a_cold_cache_does(target, sampling):
    cached = conversation(BatchDecoder(target, slots=2, prefill_chunk=16), sampling)
    cold = conversation(BatchDecoder(target, slots=2, prefill_chunk=16, prompt_cache=False), sampling)
    for hot, plain in zip(cached, cold):
        assert hot["tokens"] == plain["tokens"]
        assert_logprobs_close(hot["logprobs"], plain["logprobs"])
    first = cached[0]["tokens"]
    # the whole prompt (all but its last token, whose logits choose the answer); the previous turn's prompt
    # and answer (the answer's last token was never fed); a partial prefix; nothing to reuse
    assert [r["cached"] for r in cached] == [0, len(A) - 1, len(A) + len(first) - 1, len(PREFIX), 0]
    assert [r["cached"] for r in cold] == [0] * 5


def test_continuous_batching_with_shared_prefixes_is_unchanged(target):
    """Requests sharing a prefix join a running batch (prefilling in chunks beside others' decode steps)."""
    jobs = [(A, 12), (B, 6), (A, 9), (OTHER, 5), (B + [52], 7), (PREFIX + [9, 9], 4)]

    def run(decoder):
        outputs, owner, pending = [[] for _ in jobs], {}, list(enumerate(jobs))
        while pending or decoder.running:
            while pending and decoder.has_free_slot():
                i, (prompt, n) = pending.pop(0)
                owner[decoder.add(prompt, n, eos_id=None)] = i
            for event in decoder.step():
                outputs[owner[event.seq_id]] += event.tokens
        return outputs

    decoder = BatchDecoder(target, slots=2, prefill_chunk=8)
    assert run(decoder) == [generate(target, p, n, eos_id=None) for p, n in jobs]
    assert decoder.stats["cached"] >= 2 * len(PREFIX)  # at least two requests found the prefix cached


@pytest.mark.parametrize("proposer", ["draft-model", "prompt-lookup"])
def test_speculative_decoding_stays_exact_on_reused_prefixes(target, draft, proposer):
    """The draft model's cache is reused with the target's (only what both hold), prompt lookup needs none."""
    decoder = BatchDecoder(target, slots=2, prefill_chunk=16, draft=draft if proposer == "draft-model"
                           else PromptLookup(), k=3)
    first = serve(decoder, A, 10)["tokens"]
    follow_up = A + first + REPETITIVE[1:]  # its answer repeats earlier tokens: prompt lookup drafts
    results = [serve(decoder, follow_up, 10), serve(decoder, B, 10), serve(decoder, A, 10)]
    assert first == generate(target, A, 10, eos_id=None)
    for prompt, result in zip([follow_up, B, A], results):
        assert result["tokens"] == generate(target, prompt, 10, eos_id=None)
    assert all(r["cached"] >= len(PREFIX) for r in results) and decoder.stats["drafted"] > 0


def test_slot_choice_prefers_a_shared_prefix_then_the_least_recently_used(target):
    decoder = BatchDecoder(target, slots=2)
    a = serve(decoder, A, 3)
    other = serve(decoder, OTHER, 3)
    assert (a["slot"], other["slot"]) == (0, 1)  # an unused slot before evicting a cached prefix (BOS is no match)
    b = serve(decoder, B, 3)
    assert (b["slot"], b["cached"]) == (0, len(PREFIX))  # the slot holding the prefix, though used more recently
    unrelated = serve(decoder, [1, 400, 401], 3)
    assert (unrelated["slot"], unrelated["cached"]) == (1, 1)  # no prefix worth keeping: the least recently freed
    again = serve(decoder, A, 3)  # B overwrote A's tail in slot 0: only the shared prefix is left
    assert (again["slot"], again["cached"]) == (0, len(PREFIX)) and again["tokens"] == a["tokens"]


def test_prompt_logprobs_requests_reuse_nothing(target):
    """The prompt's log-probabilities come from its prefill's logits, so such a request prefills it all."""
    decoder = BatchDecoder(target, slots=1)
    serve(decoder, A, 4)
    hot = serve(decoder, A, 4, Sampling(prompt_logprobs=2, logprobs=2))
    cold = serve(BatchDecoder(target, slots=1, prompt_cache=False), A, 4, Sampling(prompt_logprobs=2, logprobs=2))
    assert hot["cached"] == 0 and hot["tokens"] == cold["tokens"]
    assert_logprobs_close(hot["prompt_logprobs"], cold["prompt_logprobs"])
    assert serve(decoder, A, 4)["cached"] == len(A) - 1  # and it leaves its own tokens for the next


def test_without_the_cache_slots_are_taken_lowest_first(target):
    decoder = BatchDecoder(target, slots=3, prompt_cache=False)
    assert [serve(decoder, p, 2)["slot"] for p in (A, OTHER, A)] == [0, 0, 0]
    assert decoder.stats["cached"] == 0 and all(not held for held in decoder.retained)


def test_retained_prefix_survives_other_slots_decoding(target):
    """Free slots are never written by the steps of the others (their rows feed only the scratch tail)."""
    decoder = BatchDecoder(target, slots=3, prefill_chunk=8)
    serve(decoder, A, 4)
    snapshot = [k[0, :, :len(A)].clone() for k in decoder.cache.k]
    serve(decoder, OTHER, 20)
    assert all(torch.equal(k[0, :, :len(A)], s) for k, s in zip(decoder.cache.k, snapshot))
