"""Penalties, min-p and log-probabilities in the engine (model/sampling.py, step.py, decoder.py), against
independent references: transformers' own repetition-penalty processor and OpenAI's formula for the
presence/frequency penalties, and the model's full forward over the whole sequence for every logit."""

import dataclasses

import pytest
import torch
from test_serving_math import PROMPTS, REPETITIVE, decode

from model.decoder import BatchDecoder
from model.sampling import Sampling, SlotPenalties, penalize, probabilities
from model.speculative import PromptLookup

pytestmark = pytest.mark.usefixtures("single_thread")

PENALIZED = Sampling(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3)
ATOL = 1e-4


def reference_penalties(logits: torch.Tensor, prompt: list[int], generated: list[int], setting: Sampling):
    """transformers' RepetitionPenaltyLogitsProcessor over prompt + generated, then OpenAI's
    `mu[j] -= c[j] * alpha_frequency + float(c[j] > 0) * alpha_presence` over the generated tokens."""
    from transformers import RepetitionPenaltyLogitsProcessor

    scores = RepetitionPenaltyLogitsProcessor(setting.repetition_penalty)(torch.tensor([prompt + generated]),
                                                                         logits[None].clone())[0]
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=len(logits)).float()
    return scores - counts * setting.frequency_penalty - (counts > 0).float() * setting.presence_penalty


def reference_greedy(model, prompt: list[int], n: int, setting: Sampling, eos_id=None):
    """Greedy decoding by full forwards: (tokens, raw log-softmax of each step's logits)."""
    tokens, rows = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([tokens]))[0, -1]
            rows.append(logits.log_softmax(-1))
            token = int(reference_penalties(logits, prompt, tokens[len(prompt):], setting).argmax())
            if token == eos_id:
                break
            tokens.append(token)
    return tokens[len(prompt):], rows


def test_penalize_is_transformers_repetition_then_openais_presence_and_frequency():
    torch.manual_seed(0)
    logits = torch.randn(64) * 3
    prompt, generated = [1, 5, 9, 9, 30], [9, 12, 12, 12, 40, 5]
    counts = torch.bincount(torch.tensor(generated), minlength=64).float()
    mask = torch.zeros(64, dtype=torch.bool)
    mask[prompt] = True
    got = penalize(logits, counts, mask, torch.tensor(0.5), torch.tensor(0.3), torch.tensor(1.3))
    torch.testing.assert_close(got, reference_penalties(logits, prompt, generated, PENALIZED))
    assert not torch.equal(got, logits)
    neutral = penalize(logits, counts, mask, torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0))
    assert torch.equal(neutral, logits)  # neutral settings change nothing, not even the last bit


def test_slot_penalties_keep_each_slots_own_settings_and_counts():
    penalties = SlotPenalties(slots=3, vocab=16, device="cpu")
    penalties.start(0, PENALIZED, [1, 4])
    penalties.start(2, Sampling(repetition_penalty=2.0), [3])
    penalties.record(0, [7, 7, 4])
    logits = torch.linspace(-2, 2, 16).repeat(3, 1)
    got = penalties.rows(logits, [0, 1, 2])
    torch.testing.assert_close(got[0], reference_penalties(logits[0], [1, 4], [7, 7, 4], PENALIZED))
    assert torch.equal(got[1], logits[1])
    torch.testing.assert_close(got[2], reference_penalties(logits[2], [3], [], Sampling(repetition_penalty=2.0)))


def test_min_p_keeps_tokens_within_a_fraction_of_the_most_likely():
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0, -3.0]])
    p = logits[0].softmax(-1)
    probs = probabilities(logits, [Sampling(temperature=1.0, min_p=0.1)])[0]
    kept = p >= 0.1 * p.max()
    assert kept.tolist() == [True, True, True, False, False]
    torch.testing.assert_close(probs, torch.where(kept, p, 0.0) / p[kept].sum())
    with pytest.raises(ValueError, match="min_p"):
        Sampling(min_p=1.5)
    with pytest.raises(ValueError, match="repetition_penalty"):
        Sampling(repetition_penalty=0.0)


def test_penalized_greedy_decoding_equals_the_reference_batched_and_speculative(target):
    """Several sequences with different penalties in one batch, fewer slots than jobs, prefill in chunks,
    and again with prompt lookup drafting (guesses count as generated tokens inside the verify step)."""
    settings = [PENALIZED, Sampling(), Sampling(repetition_penalty=0.7), Sampling(frequency_penalty=-1.0),
                Sampling(presence_penalty=2.0), PENALIZED]
    prompts = PROMPTS[:4] + [REPETITIVE, PROMPTS[5]]
    expected = [reference_greedy(target, p, 20, s)[0] for p, s in zip(prompts, settings)]
    assert expected[0] != reference_greedy(target, prompts[0], 20, Sampling())[0]  # the penalties matter here
    jobs = [(p, 20, s) for p, s in zip(prompts, settings)]
    assert [r[0] for r in decode(BatchDecoder(target, slots=3, prefill_chunk=5), jobs)] == expected
    speculative = BatchDecoder(target, slots=3, prefill_chunk=5, draft=PromptLookup(), k=4)
    assert [r[0] for r in decode(speculative, jobs)] == expected
    assert speculative.stats["drafted"] > 0


def test_logprobs_are_the_raw_log_softmax_with_the_top_n(target):
    """Each emitted token's log-probability and top 3 are the full forward's raw log-softmax at that step
    (before penalties and temperature), for greedy and sampled, penalized and plain, speculative too."""
    jobs = [(PROMPTS[0], 12, Sampling(logprobs=3)), (PROMPTS[2], 12, dataclasses.replace(PENALIZED, logprobs=3)),
            (REPETITIVE, 12, Sampling(temperature=0.9, seed=3, logprobs=3)), (PROMPTS[1], 12, Sampling())]
    for decoder in (BatchDecoder(target, slots=2, prefill_chunk=4),
                    BatchDecoder(target, slots=2, prefill_chunk=4, draft=PromptLookup(), k=3)):
        results = decode(decoder, jobs)
        assert results[3][1] == []  # a sequence that did not ask reports nothing
        for (prompt, _, _), (tokens, logprobs, _) in zip(jobs[:3], results[:3]):
            assert [e.token for e in logprobs] == tokens and len(tokens) == 12
            with torch.no_grad():
                full = target(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].log_softmax(-1)
            for row, entry, token in zip(full, logprobs, tokens):
                assert abs(entry.logprob - float(row[token])) < ATOL
                top = row.topk(3)
                assert [t for t, _ in entry.top] == top.indices.tolist()
                torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), top.values, atol=ATOL, rtol=0)


def test_prompt_logprobs_come_from_the_prefill_in_chunks(target):
    """A prompt prefilled over several chunks: every prompt token after the first gets the full forward's
    log-probability and top 2; the first gets None."""
    prompt = PROMPTS[5]
    results = decode(BatchDecoder(target, slots=2, prefill_chunk=5), [(prompt, 3, Sampling(prompt_logprobs=2)),
                                                                       (PROMPTS[0], 3, Sampling())])
    prompt_logprobs = results[0][2]
    assert results[1][2] is None and len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    with torch.no_grad():
        full = target(torch.tensor([prompt]))[0, :-1].log_softmax(-1)
    for row, entry, token in zip(full, prompt_logprobs[1:], prompt[1:]):
        assert entry.token == token and abs(entry.logprob - float(row[token])) < ATOL
        assert [t for t, _ in entry.top] == row.topk(2).indices.tolist()


def test_the_eos_that_ends_a_sequence_has_its_logprob_reported(target):
    tokens, _ = reference_greedy(target, PROMPTS[0], 6, Sampling())
    eos = tokens[3]  # pretend the fourth greedy token is EOS: the sequence stops there
    (out, logprobs, _), = decode(BatchDecoder(target, slots=1), [(PROMPTS[0], 6, Sampling(logprobs=0))], eos_id=eos)
    assert out == tokens[:3] and [e.token for e in logprobs] == tokens[:4] and logprobs[-1].top == ()


def test_a_verify_steps_guesses_count_as_generated_for_the_columns_after_them(target):
    """The step fed a sequence's last token and three guesses: column j's logits are penalized as if the
    guesses before it (and at it) had been generated, against the full forward and the reference."""
    decoder = BatchDecoder(target, slots=2, draft=PromptLookup(), k=3)
    seq = decoder.running[decoder.add(PROMPTS[0], 10, PENALIZED, eos_id=None)]
    decoder.step()
    decoder.step()  # prefill, then one decode step: two generated tokens, one of them fed
    guesses = [seq.tokens[-1], 7, 7]
    chunk = seq.tokens[seq.filled:] + guesses
    grid, logprobs = decoder.decode_step.run([seq.slot], [seq.filled], [chunk], counted=[len(seq.tokens)])
    with torch.no_grad():
        full = target(torch.tensor([seq.tokens + guesses]))[0, seq.filled:]
    generated = seq.tokens[seq.prompt_len:]
    for j in range(len(chunk)):
        expected = reference_penalties(full[j], seq.tokens[:seq.prompt_len], generated + guesses[:j], PENALIZED)
        torch.testing.assert_close(grid[0, j], expected, atol=ATOL, rtol=0)  # row 0: the one slot fed
        torch.testing.assert_close(logprobs[0, j], full[j].log_softmax(-1), atol=ATOL, rtol=0)
