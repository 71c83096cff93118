"""Proposers for speculative decoding: who guesses the next k tokens the target then verifies.

- `PromptLookup`: n-gram drafting (prompt lookup decoding, as transformers' `prompt_lookup_num_tokens`
  and vLLM's `ngram` do): find the latest earlier occurrence of the sequence's last n tokens and
  propose what followed it. No second model; it pays off when the output copies from the input
  (summaries, edits, extraction, code), and costs nearly nothing when it finds nothing.
- `DraftModel`: a small model with the same vocabulary drafts greedily or by sampling under the
  request's own settings, batched over the running sequences with its own slot cache.

Both return, per sequence, the drafted ids and the distributions they were drawn from (None for
prompt lookup, whose proposal is deterministic); `model.sampling.accept_drafts` verifies them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.llama import Llama
from model.sampling import draw, probabilities
from model.slots import SlotCache, forward_rows
from model.step import DecodeStep


class PromptLookup:
    """Draft by matching the last `max_ngram` .. `min_ngram` tokens earlier in the sequence.

    At least two tokens must match by default: a lone repeated token (a space, a comma) predicts little,
    and every guess costs a wider verify step (the tiny model on 16 input-grounded prompts, compiled, one
    thread, a 2-core AMX Xeon; benchmarks/README.md: with 1-gram matches 25% of guesses were accepted,
    1.52 tokens per target pass, 1.17-1.19x plain decoding; from 2-grams 41%, 1.42 tokens per pass,
    1.20-1.21x, with fewer passes paying for a verify)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup n-gram sizes: need 1 <= min_ngram <= max_ngram, "
                             f"got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching tail."""
        if k <= 0:
            return []
        ids = np.asarray(tokens)
        length = len(ids)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            tail = ids[length - n:]
            starts = np.flatnonzero(ids[:length - n] == tail[0])  # candidates ending before the tail
            for start in starts[::-1]:
                if np.array_equal(ids[start:start + n], tail):
                    return ids[start + n:start + n + k].tolist()
        return []


class DraftModel:
    """A small model drafting for the target, one slot per target slot, kept in step with it.

    A sequence's `draft_filled` is how many of its tokens this model's cache holds; each round
    first feeds what it lacks (the tokens the target accepted since), then drafts one token per forward.
    """

    def __init__(self, model: Llama, slots: int, max_len: int, spare: int, widths: Sequence[int] = (1,),
                 compile: bool = False):
        self.model = model
        self.cache = SlotCache.for_model(model, slots, max_len, spare)
        self.step = DecodeStep(model, self.cache, widths, compile)

    def prefill(self, slots: Sequence[int], starts: Sequence[int], chunks: Sequence[Sequence[int]]) -> None:
        forward_rows(self.model, self.cache, slots, starts, chunks, [1] * len(chunks))

    def propose(self, seqs: Sequence, ks: Sequence[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        """`seqs` (with `.slot`, `.tokens`, `.draft_filled`, `.sampling`, `.generator`) draft `ks[i]` tokens each."""
        drafts: list[list[int]] = [[] for _ in seqs]
        dists: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [i for i, k in enumerate(ks) if k > 0]
        while active:
            chunks = [(seqs[i].tokens + drafts[i])[seqs[i].draft_filled:] for i in active]
            slots, starts = [seqs[i].slot for i in active], [seqs[i].draft_filled for i in active]
            if self.step.width(max(len(c) for c in chunks)) is None:  # a long catch-up: eagerly, at any width
                logits = torch.cat(forward_rows(self.model, self.cache, slots, starts, chunks, [1] * len(active)))
            else:  # the compiled step; each row's last fed token predicts its next draft
                grid, _ = self.step.run(slots, starts, chunks)  # row i: slots[i]
                logits = grid[range(len(chunks)), [len(c) - 1 for c in chunks]]
            choices = logits.argmax(-1).tolist()
            for row, i in enumerate(active):
                seq = seqs[i]
                seq.draft_filled += len(chunks[row])
                if seq.sampling.greedy:  # verified against the target's argmax: no distribution needed
                    drafts[i].append(choices[row])
                else:
                    q = probabilities(logits[row:row + 1], [seq.sampling])[0]
                    drafts[i].append(draw(q, seq.generator))
                    dists[i].append(q)
            active = [i for i in active if len(drafts[i]) < ks[i]]
        return [(d, torch.stack(q) if q else None) for d, q in zip(drafts, dists)]
