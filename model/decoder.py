"""Continuous batching: many sequences decoding together, joining and leaving between steps.

`BatchDecoder` owns a slot cache (model/slots.py) and the running sequences. Each `step()`:
1. prefill: feeds up to `prefill_chunk` prompt tokens of the sequences still reading their prompt
   (oldest first, a long prompt over several steps), in one forward, so a new request never stalls
   the others for more than one chunk; a sequence whose prompt is complete gets its first token;
2. decode: one forward over every other running sequence, each feeding its last token, or, when
   speculating, its last token plus its drafted guesses (prompt lookup or a draft model), which the
   target verifies in that same forward (`model.sampling.accept_drafts`).
A sequence ends at EOS (finish "stop"; EOS is not emitted) or when its budget (max_new_tokens, or
what the context leaves) is spent (finish "length"); `cancel` ends one at once. Either frees its slot
for the next `add`.

The prompt cache (llama.cpp's `cache_prompt`, on unless `prompt_cache=False`): a freed slot keeps the
tokens whose keys/values it still holds, and `add` takes the free slot that shares the longest prefix
with the new prompt (ties, and prompts that share nothing: the least recently freed slot, so a cached
prefix survives as long as possible), then prefills only from the end of that prefix. Reusing those
entries is exact because a query at position p attends to its row's keys 0..p only (model/slots.py):
the previous occupant's entries from p on are overwritten before anything reads them. At least the last
prompt token is always fed (its logits choose the first new token), and a request for its prompt's
log-probabilities reuses nothing (they come from the prefill's logits of every prompt position).

Each sequence samples under its own `Sampling`: its penalties live per slot on the device
(model/sampling.py `SlotPenalties`, applied inside the step), and when it asks for `logprobs` each
event carries the raw log-probability (and the top N) of every token it emits, EOS included; with
`prompt_logprobs` its first event carries those of its prompt tokens, read from the prefill's logits.
The scheduling policy (who waits, when to step) is the caller's: serving/engine.py, or
model/generate.py for one sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count

import torch

from model.llama import Llama
from model.sampling import (
    Sampling,
    SlotPenalties,
    TokenLogprob,
    accept_drafts,
    accept_greedy,
    draw,
    pick_logprobs,
    probabilities,
)
from model.slots import SlotCache, forward_rows
from model.speculative import DraftModel, PromptLookup
from model.step import DecodeStep

GREEDY = Sampling()  # the default of BatchDecoder.add (Sampling is frozen, so one instance serves all)


def check_prompt(prompt_ids: Sequence[int], vocab_size: int, max_len: int) -> list[int]:
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("prompt_ids: empty prompt (start it with BOS)")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt_ids: token id {bad[0]} outside the vocabulary (size {vocab_size})")
    if len(prompt) >= max_len:
        raise ValueError(f"prompt_ids: {len(prompt)} tokens leave no room in max_seq_len={max_len}")
    return prompt


@dataclass
class Running:
    """One sequence in a slot. The target's cache holds `tokens[:filled]`, the draft's `tokens[:draft_filled]`."""

    id: int
    slot: int
    tokens: list[int]
    prompt_len: int
    budget: int
    sampling: Sampling
    generator: torch.Generator
    eos_id: int | None
    filled: int = 0
    draft_filled: int = 0
    cached: int = 0  # prompt tokens whose keys/values the slot held already (the prompt cache)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # read during prefill when the sampling asks

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class Event:
    """What one step produced for one sequence: final new ids, and why it ended (None: still running).

    With `Sampling.logprobs`, `logprobs` has one entry per token and one more for the EOS that ended
    it (EOS is not in `tokens`); with `Sampling.prompt_logprobs`, the first event's `prompt_logprobs`
    has one per prompt token (None for the first, which nothing predicts). `cached`: on the first
    event, how many prompt tokens came from the prompt cache rather than a prefill."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    drafted: int = 0
    accepted: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached: int = 0

    def merge(self, later: Event) -> Event:
        """This event followed by a later one of the same sequence, as one."""
        return Event(self.seq_id, self.tokens + later.tokens, later.finish, self.drafted + later.drafted,
                     self.accepted + later.accepted, self.logprobs + later.logprobs,
                     self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
                     self.cached + later.cached)


class BatchDecoder:
    def __init__(self, model: Llama, slots: int, max_len: int | None = None, prefill_chunk: int = 256,
                 draft: Llama | PromptLookup | None = None, k: int = 4, compile: bool = False,
                 prompt_cache: bool = True):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: must be >= 1, got {prefill_chunk}")
        limit = model.config.max_seq_len
        if isinstance(draft, Llama):
            if draft.config.vocab_size != model.config.vocab_size:
                raise ValueError(f"draft vocab_size: {draft.config.vocab_size} differs from the target's "
                                 f"{model.config.vocab_size}")
            limit = min(limit, draft.config.max_seq_len)
        if draft is not None and k < 1:
            raise ValueError(f"k: must be >= 1, got {k}")
        self.model, self.k, self.prefill_chunk = model, k, prefill_chunk
        self.max_len = min(max_len or limit, limit)
        spare = max(prefill_chunk, k + 1)
        self.cache = SlotCache.for_model(model, slots, self.max_len, spare)
        self.penalties = SlotPenalties(slots, model.config.vocab_size, self.cache.device)
        widths = (1, k + 1) if draft is not None else (1,)
        self.decode_step = DecodeStep(model, self.cache, widths, compile, self.penalties)
        self.lookup = draft if isinstance(draft, PromptLookup) else None
        self.drafter = (DraftModel(draft, slots, self.max_len, spare, widths, compile) if isinstance(draft, Llama)
                        else None)
        self.decode_step.warm_up()
        if self.drafter is not None:
            self.drafter.step.warm_up()
        self.slots, self.prompt_cache = slots, prompt_cache
        self.free = set(range(slots))
        self.retained: list[list[int]] = [[] for _ in range(slots)]  # per free slot: the tokens its cache holds
        self._freed_at = [-1] * slots  # when each slot was last freed (its LRU order)
        self.running: dict[int, Running] = {}
        self.stats = {"target_passes": 0, "drafted": 0, "accepted": 0, "cached": 0}
        self._ids = count()
        self._clock = count()

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def has_free_slot(self) -> bool:
        return bool(self.free)

    def add(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling = GREEDY,
            eos_id: int | None = 2) -> int:
        """Start a sequence in a free slot (`_claim`: the one whose cache holds the longest prefix of the
        prompt), prefilling from the end of that prefix; returns its id."""
        prompt = check_prompt(prompt_ids, self.model.config.vocab_size, self.max_len)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if not self.free:
            raise RuntimeError("no free slot: wait for a sequence to finish")
        slot, cached = self._claim(prompt, reuse=sampling.prompt_logprobs is None)
        seq = Running(next(self._ids), slot, prompt, len(prompt),
                      min(max_new_tokens, self.max_len - len(prompt)), sampling, sampling.generator(self.device),
                      eos_id, filled=cached, draft_filled=cached if self.drafter is not None else 0, cached=cached,
                      prompt_logprobs=None if sampling.prompt_logprobs is None else [None])
        self.stats["cached"] += cached
        self.penalties.start(seq.slot, sampling, prompt)
        self.running[seq.id] = seq
        return seq.id

    def cancel(self, seq_id: int) -> None:
        """End a sequence now and free its slot (a no-op for one that already ended); the slot keeps the
        tokens its cache holds for the prompt cache: those the target (and the draft model) were fed,
        minus accepted guesses past an EOS or the budget, which the sequence did not keep."""
        seq = self.running.pop(seq_id, None)
        if seq is not None:
            valid = min(seq.filled, len(seq.tokens))
            if self.drafter is not None:
                valid = min(valid, seq.draft_filled)
            self.retained[seq.slot] = seq.tokens[:valid] if self.prompt_cache else []
            self._freed_at[seq.slot] = next(self._clock)
            self.free.add(seq.slot)

    def _claim(self, prompt: list[int], reuse: bool) -> tuple[int, int]:
        """Take a free slot for `prompt`: the one holding its longest prefix (if `_worth` taking), else the
        least recently freed (never used: the lowest); returns it and how many prompt tokens its cache
        holds (never the last one, whose logits are needed; none without `reuse`). Without the prompt
        cache, the lowest free slot (running rows stay contiguous, the compiled step's batch bucket small)."""
        if not self.prompt_cache:
            slot, cached = min(self.free), 0
        else:
            shared = {s: _shared_prefix(self.retained[s], prompt, len(prompt) - 1) if reuse else 0 for s in self.free}
            slot = max(self.free, key=lambda s: (_worth(shared[s], len(prompt)), -self._freed_at[s], -s))
            cached = shared[slot]
        self.free.remove(slot)
        self.retained[slot] = []
        return slot, cached

    @torch.inference_mode()
    def step(self) -> list[Event]:
        events: dict[int, Event] = {}
        started = self._prefill(events)
        decoding = [s for s in self.running.values()
                    if s.prompt_len <= s.filled == len(s.tokens) - 1 and s.id not in started]
        if decoding:
            self._decode(decoding, events)
        return list(events.values())

    def _prefill(self, events: dict[int, Event]) -> set[int]:
        budget, batch = self.prefill_chunk, []
        for seq in self.running.values():
            if seq.filled < seq.prompt_len and budget > 0:
                n = min(budget, seq.prompt_len - seq.filled)
                batch.append((seq, seq.tokens[seq.filled:seq.filled + n]))
                budget -= n
        if not batch:
            return set()
        seqs = [s for s, _ in batch]
        slots, starts, chunks = [s.slot for s in seqs], [s.filled for s in seqs], [c for _, c in batch]
        # every fed position's logits for a sequence that reports its prompt's log-probabilities, else the last's
        keep = [len(c) if s.prompt_logprobs is not None else 1 for s, c in batch]
        logits = forward_rows(self.model, self.cache, slots, starts, chunks, keep)
        if self.drafter is not None:
            self.drafter.prefill(slots, starts, chunks)
        self.stats["target_passes"] += 1
        done = []
        for seq, chunk, row in zip(seqs, chunks, logits):
            if seq.prompt_logprobs is not None:
                _read_prompt(seq, seq.filled, row)
            seq.filled += len(chunk)
            seq.draft_filled = seq.filled if self.drafter is not None else 0
            if seq.filled == seq.prompt_len:
                done.append((seq, row[-1:]))
        started = [s for s, _ in done]
        if started:
            raw = torch.cat([row for _, row in done]).float()
            penalized = self.penalties.rows(raw, [s.slot for s in started]) if _processed(started) else raw
            tokens = next_tokens(penalized, started)
            logprobs = _token_logprobs(started, [[t] for t in tokens], lambda i, j: raw[i].log_softmax(-1))
            for seq, token, lps in zip(started, tokens, logprobs):
                event = events.setdefault(seq.id, Event(seq.id))
                event.prompt_logprobs, event.cached = seq.prompt_logprobs, seq.cached
                self._append(seq, [token], event, lps)
        return {s.id for s in started}

    def _decode(self, seqs: list[Running], events: dict[int, Event]) -> None:
        ks = [min(self.k, s.budget - s.generated - 1) for s in seqs]
        if self.lookup is not None:
            proposals = [(self.lookup.propose(s.tokens, k), None) for s, k in zip(seqs, ks)]
        elif self.drafter is not None:
            proposals = self.drafter.propose(seqs, ks)
        else:
            proposals = [([], None)] * len(seqs)
        chunks = [s.tokens[s.filled:] + drafts for s, (drafts, _) in zip(seqs, proposals)]
        keep = [len(drafts) + 1 for drafts, _ in proposals]  # = len(chunks[i]): every fed token is scored
        grid, logprobs = self.decode_step.run([s.slot for s in seqs], [s.filled for s in seqs], chunks,
                                              counted=[len(s.tokens) for s in seqs], process=_processed(seqs))
        choices = grid.argmax(-1).tolist()  # the step's one device->host transfer (greedy rows need no more)
        sampled = [i for i, seq in enumerate(seqs) if not seq.sampling.greedy]
        probs = {}
        if sampled:  # row i of the grid is seqs[i]'s
            rows = [i for i in sampled for _ in range(keep[i])]
            columns = [j for i in sampled for j in range(keep[i])]
            settings = [seqs[i].sampling for i in sampled for _ in range(keep[i])]
            probs = dict(zip(sampled, probabilities(grid[rows, columns], settings).split([keep[i] for i in sampled])))
        self.stats["target_passes"] += 1
        verified = []
        for i, (seq, (drafts, proposal)) in enumerate(zip(seqs, proposals)):
            if seq.sampling.greedy:
                verified.append(accept_greedy(drafts, choices[i][:keep[i]]))
            else:
                verified.append(accept_drafts(probs[i], drafts, proposal, seq.generator))
        # column j of a row predicted its j-th new token
        reported = _token_logprobs(seqs, [new for new, _ in verified], lambda i, j: logprobs[i, j])
        for seq, (drafts, _), (new, accepted), lps in zip(seqs, proposals, verified, reported):
            event = events.setdefault(seq.id, Event(seq.id))
            event.drafted += len(drafts)
            event.accepted += accepted
            self.stats["drafted"] += len(drafts)
            self.stats["accepted"] += accepted
            seq.filled = len(seq.tokens) + accepted  # the fed guesses the target kept are valid cache entries
            self._append(seq, new, event, lps)
            seq.draft_filled = min(seq.draft_filled, seq.filled)

    def _append(self, seq: Running, tokens: list[int], event: Event, logprobs: list[TokenLogprob] | None) -> None:
        """Emit `tokens` (`logprobs[j]`: token j's, when the sequence reports them) up to EOS or the budget;
        count them in the slot's penalties."""
        kept = []
        for j, token in enumerate(tokens):
            if logprobs is not None:
                event.logprobs.append(logprobs[j])
            if token == seq.eos_id:
                event.finish = "stop"
                break
            kept.append(token)
            if seq.generated + len(kept) >= seq.budget:
                event.finish = "length"
                break
        seq.tokens += kept
        event.tokens += kept
        if kept and seq.sampling.penalized:
            self.penalties.record(seq.slot, kept)
        if event.finish is not None:
            self.cancel(seq.id)


def _shared_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`."""
    n = 0
    for x, y in zip(a, b):
        if x != y or n == limit:
            break
        n += 1
    return n


def _worth(shared: int, prompt_len: int) -> int:
    """A shared prefix as a reason to pick its slot: none when it is only the first token (the BOS nearly
    every prompt starts with) or under a tenth of the prompt (llama.cpp's slot similarity), so a trivial
    match never evicts a slot's long cached prefix while another free slot would do."""
    return shared if shared > 1 and 10 * shared >= prompt_len else 0


def _processed(seqs: Sequence[Running]) -> bool:
    """Whether any of these sequences needs its logits penalized or its log-probabilities reported."""
    return any(seq.sampling.penalized or seq.sampling.logprobs is not None for seq in seqs)


def _read_prompt(seq: Running, start: int, logits: torch.Tensor) -> None:
    """Prompt log-probabilities from a prefill chunk fed at `start`: row q predicted prompt token start + q + 1."""
    n = min(len(logits), seq.prompt_len - 1 - start)
    if n > 0:
        seq.prompt_logprobs += pick_logprobs(logits[:n].float().log_softmax(-1), seq.tokens[start + 1:start + 1 + n],
                                             [seq.sampling.prompt_logprobs] * n)


def _token_logprobs(seqs: Sequence[Running], tokens: Sequence[list[int]],
                    row: Callable[[int, int], torch.Tensor]) -> list[list[TokenLogprob] | None]:
    """Per sequence, the log-probabilities of its new `tokens[i]` (None where it does not report them);
    `row(i, j)` is the (vocab,) raw log-probabilities that chose sequence i's j-th token. One transfer."""
    wanted = [(i, j) for i, seq in enumerate(seqs) if seq.sampling.logprobs is not None for j in range(len(tokens[i]))]
    out: list[list[TokenLogprob] | None] = [[] if seq.sampling.logprobs is not None else None for seq in seqs]
    if wanted:
        picked = pick_logprobs(torch.stack([row(i, j) for i, j in wanted]), [tokens[i][j] for i, j in wanted],
                               [seqs[i].sampling.logprobs for i, _ in wanted])
        for (i, _), entry in zip(wanted, picked):
            out[i].append(entry)
    return out


def next_tokens(logits: torch.Tensor, seqs: Sequence[Running]) -> list[int]:
    """One token per row: the argmax for greedy sequences (no distribution built), a draw from the
    filtered distribution for the others."""
    choices = logits.argmax(-1).tolist()
    sampled = [i for i, seq in enumerate(seqs) if not seq.sampling.greedy]
    if sampled:
        probs = probabilities(logits[sampled], [seqs[i].sampling for i in sampled])
        for i, p in zip(sampled, probs):
            choices[i] = draw(p, seqs[i].generator)
    return choices
