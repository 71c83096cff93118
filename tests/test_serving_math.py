"""The math of serving (model/slots.py, decoder.py, sampling.py, speculative.py, stops.py, textstream.py):
batched decoding equals decoding each sequence alone, speculative decoding is exact when greedy and
distribution-preserving when sampling, prompt lookup finds what it should."""

import pytest
import torch

from model.decoder import BatchDecoder
from model.generate import generate, speculative_generate
from model.sampling import Sampling, accept_drafts, probabilities
from model.slots import SlotCache, forward_rows
from model.speculative import PromptLookup
from model.textstream import TextStream

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = [[1, 17, 250, 31, 400, 9], [1, 5], [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311],
           [1, 42, 42, 42], [1, 88, 7, 88, 7, 88, 7, 88], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
REPETITIVE = [1, 20, 21, 22, 23, 24, 20, 21, 22, 23, 24, 20, 21, 22]


def decode(decoder: BatchDecoder, jobs, eos_id=None) -> list[list]:
    """Every job to the end, continuous batching as a server does it (add whenever a slot is free, step until
    all finish): (tokens, logprobs, prompt_logprobs) per job."""
    results = [[[], [], None] for _ in jobs]
    owner, pending = {}, list(enumerate(jobs))
    while pending or decoder.running:
        while pending and decoder.has_free_slot():
            i, (prompt, n, sampling) = pending.pop(0)
            owner[decoder.add(prompt, n, sampling, eos_id)] = i
        for event in decoder.step():
            result = results[owner[event.seq_id]]
            result[0] += event.tokens
            result[1] += event.logprobs
            result[2] = event.prompt_logprobs if event.prompt_logprobs is not None else result[2]
    return results


def run_all(decoder: BatchDecoder, jobs: list[tuple[list[int], int, Sampling]], eos_id=None) -> list[list[int]]:
    """The tokens `decode` emits for each job."""
    return [tokens for tokens, _, _ in decode(decoder, jobs, eos_id)]


def test_slot_forward_matches_a_full_forward_per_row(target):
    """Rows of different lengths, fed in ragged chunks at their own positions, give each sequence's
    own logits (what the model computes on that sequence alone, without a cache)."""
    cache = SlotCache.for_model(target, slots=3, max_len=32, spare=16)
    seqs = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    with torch.no_grad():
        first = forward_rows(target, cache, [2, 0, 1], [0, 0, 0], [s[:3] for s in seqs], [3, 3, 3])
        rest = forward_rows(target, cache, [2, 0, 1], [3, 3, 3], [s[3:] for s in seqs], [len(s) - 3 for s in seqs])
        for seq, a, b in zip(seqs, first, rest):
            full = target(torch.tensor([seq]))[0]
            torch.testing.assert_close(torch.cat([a, b]), full, atol=1e-5, rtol=1e-4)


def test_batched_decoding_equals_each_sequence_alone(target):
    """Fewer slots than requests (they join as others leave), a prefill chunk smaller than most
    prompts (long ones prefill over several steps while others decode): same tokens as alone."""
    lengths = [20, 7, 15, 30, 3, 12]
    expected = [generate(target, p, n, eos_id=None) for p, n in zip(PROMPTS, lengths)]
    decoder = BatchDecoder(target, slots=3, prefill_chunk=5)
    assert run_all(decoder, [(p, n, Sampling()) for p, n in zip(PROMPTS, lengths)]) == expected
    assert sorted(decoder.free) == [0, 1, 2] and not decoder.running


def test_seeded_sampling_does_not_depend_on_the_batch(target):
    settings = Sampling(temperature=1.0, top_p=0.9, seed=5)
    alone = run_all(BatchDecoder(target, slots=1), [(PROMPTS[0], 25, settings)])[0]
    crowd = [(p, 25, Sampling(temperature=0.8, seed=i)) for i, p in enumerate(PROMPTS[1:])]
    together = run_all(BatchDecoder(target, slots=4, prefill_chunk=4),
                       crowd[:2] + [(PROMPTS[0], 25, settings)] + crowd[2:])
    assert together[2] == alone
    assert generate(target, PROMPTS[0], 25, temperature=1.0, top_p=0.9, seed=5, eos_id=None) == alone


def test_eos_budget_context_and_cancel(target):
    decoder = BatchDecoder(target, slots=2, max_len=16)
    full = generate(target, PROMPTS[0], 10, eos_id=None)
    stopped = decoder.add(PROMPTS[0], 10, eos_id=full[3])
    context = decoder.add(PROMPTS[0], 100, eos_id=None)  # 16 - 6 = 10 tokens fit
    finished = {}
    while decoder.running:
        for event in decoder.step():
            finished.setdefault(event.seq_id, []).extend(event.tokens)
            if event.finish:
                finished[(event.seq_id, "finish")] = event.finish
    assert finished[stopped] == full[:full.index(full[3])] and finished[(stopped, "finish")] == "stop"
    assert finished[context] == full and finished[(context, "finish")] == "length"
    victim = decoder.add(PROMPTS[1], 50, eos_id=None)
    decoder.step()
    decoder.cancel(victim)
    assert not decoder.running and sorted(decoder.free) == [0, 1]
    with pytest.raises(ValueError, match="prompt_ids: 16 tokens leave no room"):
        decoder.add(list(range(1, 17)), 1)


@pytest.mark.parametrize("k", [1, 4])
def test_speculative_greedy_equals_target_greedy_in_a_batch(target, draft, k):
    lengths = [20, 7, 15, 30, 3, 12]
    jobs = [(p, n, Sampling()) for p, n in zip(PROMPTS + [REPETITIVE], lengths + [25])]
    expected = [generate(target, p, n, eos_id=None) for p, n, _ in jobs]
    for proposer in (draft, PromptLookup()):
        decoder = BatchDecoder(target, slots=3, prefill_chunk=6, draft=proposer, k=k)
        assert run_all(decoder, jobs) == expected
        assert decoder.stats["drafted"] > 0


def _successor_model():
    """A Llama whose greedy next token is the current one + 1, by construction: its blocks add nothing to the
    residual stream (zero output projections), and the head scores token v by the embedding of v - 1."""
    from model.config import micro
    from model.llama import Llama

    torch.manual_seed(12)
    model = Llama(micro().with_overrides(tie_embeddings=False)).eval()
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(model.embed_tokens.weight.roll(1, dims=0))
    return model


def test_prompt_lookup_speeds_up_input_grounded_text():
    """A prompt the model continues (a model that counts up, on a prompt that counts up twice): most
    guesses are accepted, so far fewer target passes. If none were accepted, prompt lookup is broken."""
    model = _successor_model()
    copy_prompt = [1] + list(range(40, 60)) * 2 + list(range(40, 45))
    greedy = generate(model, copy_prompt, 30, eos_id=None)
    assert greedy == list(range(45, 75)), "the model does not count up: the test's construction failed"
    stats = {}
    assert speculative_generate(model, PromptLookup(), copy_prompt, 30, k=4, eos_id=None, stats=stats) == greedy
    assert stats["accepted"] >= 10 and stats["target_passes"] < 30, stats


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    assert lookup.propose([5, 6, 7, 8, 9, 1, 5, 6, 7], 3) == [8, 9, 1]
    assert lookup.propose([5, 6, 7, 8, 5, 6, 7, 2, 5, 6, 7], 2) == [2, 5]      # the latest occurrence
    assert lookup.propose([1, 2, 3, 9, 3], 4) == [9, 3]                        # falls back to a 1-gram
    assert lookup.propose([1, 2, 3, 4], 4) == []                               # nothing repeats
    assert lookup.propose([3, 3], 0) == []
    default = PromptLookup()
    assert default.propose([1, 2, 3, 9, 3], 4) == []                           # one token is not a match
    assert default.propose([1, 2, 3, 9, 2, 3], 4) == [9, 2, 3]                 # two are


def test_rejection_sampling_preserves_the_target_distribution():
    """Leviathan et al.: drafts drawn from q, accepted with min(1, p/q), else resampled from
    max(0, p - q): the emitted token is distributed as p. Checked on a 4-token vocabulary for a
    draft model (q) and for prompt lookup (a fixed guess, q one-hot)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    target = torch.stack([p, p])
    generator = torch.Generator().manual_seed(0)
    n = 20000
    for proposal, guess in ((q, None), (None, 2)):
        counts = torch.zeros(4)
        accepted = 0
        for _ in range(n):
            draft = guess if guess is not None else int(torch.multinomial(q, 1, generator=generator))
            tokens, a = accept_drafts(target, [draft], None if proposal is None else proposal[None], generator)
            counts[tokens[0]] += 1
            accepted += a
        assert (counts / n - p).abs().max() < 0.015, counts / n
        expected_rate = float(torch.minimum(p, q).sum()) if proposal is not None else float(p[guess])
        assert abs(accepted / n - expected_rate) < 0.015


def test_sampled_speculative_decoding_is_seed_reproducible(target, draft):
    kwargs = dict(max_new_tokens=20, k=3, eos_id=None, temperature=0.9, top_p=0.95, seed=4)
    a = speculative_generate(target, draft, PROMPTS[0], **kwargs)
    assert a == speculative_generate(target, draft, PROMPTS[0], **kwargs) and len(a) == 20
    assert a != speculative_generate(target, draft, PROMPTS[0], **{**kwargs, "seed": 5})


def test_probabilities_apply_each_rows_own_settings():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]] * 4)
    settings = [Sampling(), Sampling(temperature=1.0), Sampling(temperature=1.0, top_k=2),
                Sampling(temperature=0.5, top_p=0.7)]
    probs = probabilities(logits, settings)
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(probs[1], logits[1].softmax(-1))
    torch.testing.assert_close(probs[2], torch.tensor([*logits[2, :2].softmax(-1).tolist(), 0.0, 0.0, 0.0]))
    sharp = (logits[3] / 0.5).softmax(-1)  # 0.84, 0.11, ...: 0.84 >= 0.7, so only the top token
    assert probs[3].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0] and sharp[0] > 0.7


def test_text_stream_releases_whole_characters(small_tokenizer_dir):
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(small_tokenizer_dir)
    prompt = tokenizer.encode("Say:", bos=True)
    completion = tokenizer.encode(" héllo wörld ✓ done")
    stream = TextStream(tokenizer, prompt)
    pieces = [stream.push(t) for t in completion] + [stream.finish()]
    assert "".join(pieces) == tokenizer.decode(prompt + completion)[len(tokenizer.decode(prompt)):]
    assert all("\ufffd" not in piece for piece in pieces)
