"""Sampling for a batch of sequences, each with its own settings and random stream.

`Sampling` is one request's settings; `probabilities` turns a batch of logits rows into the
distributions those settings define (temperature, then min-p, top-k, top-p: the kept tokens
renormalised), temperature 0 being the one-hot argmax. Before that, `penalize` applies the
request's penalties to the raw logits, vLLM's way: the repetition penalty (HF's, over the prompt's
and the generated tokens), then the frequency and presence penalties (OpenAI's, over the generated
tokens). `SlotPenalties` holds those settings and token counts per slot of a batch, on the device,
so the compiled decode step (model/step.py) applies them as data, never recompiling per request.
Log-probabilities (`TokenLogprob`, `pick_logprobs`) are the model's raw log-softmax, before
penalties and temperature, as vLLM returns them by default. A row's random draws come from its own `torch.Generator`,
one uniform per token (inverse CDF), so a seeded request gives the same tokens whichever other
requests share its batch. `accept_drafts` is the speculative verification step: the standard
rejection scheme (Leviathan et al. 2023, Chen et al. 2023), whose output tokens are distributed
exactly as sampling from the target alone, and which at temperature 0 accepts a guess only when it
is the target's argmax, so greedy speculative output is the target's greedy output token for token
(`accept_greedy` does that from the argmaxes alone, without building distributions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None          # per generated token: its raw log-probability and the top N (None: off)
    prompt_logprobs: int | None = None   # the same for each prompt token after the first (None: off)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (or None), got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits (else the slot's token counts are never read)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    def generator(self, device="cpu") -> torch.Generator:
        """This request's random stream: seeded when asked, else from fresh entropy."""
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def probabilities(logits: torch.Tensor, settings: Sequence[Sampling]) -> torch.Tensor:
    """(rows, vocab) logits → (rows, vocab) fp32 distributions, row i under `settings[i]`."""
    logits = logits.float()
    probs = torch.empty_like(logits)
    greedy = torch.tensor([s.greedy for s in settings], device=logits.device)
    if greedy.any():
        probs[greedy] = torch.nn.functional.one_hot(logits[greedy].argmax(-1), logits.shape[-1]).float()
    if greedy.all():
        return probs
    rows = (~greedy).nonzero().squeeze(1)
    sampled = [settings[i] for i in rows.tolist()]
    scaled = logits[rows] / torch.tensor([s.temperature for s in sampled], device=logits.device)[:, None]
    min_p = torch.tensor([s.min_p for s in sampled], device=logits.device)
    if (min_p > 0).any():  # drop tokens less likely than min_p times the most likely one (vLLM: before top-k/p)
        p = scaled.softmax(-1)
        scaled = scaled.masked_fill(p < min_p[:, None] * p.max(-1, keepdim=True).values, float("-inf"))
    top_k = torch.tensor([s.top_k if 0 < s.top_k < logits.shape[-1] else 0 for s in sampled], device=logits.device)
    top_p = torch.tensor([s.top_p for s in sampled], device=logits.device)
    if (top_k > 0).any() or (top_p < 1).any():
        ordered, order = torch.sort(scaled, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
        sorted_probs = ordered.masked_fill(drop, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop |= (sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]) & (top_p[:, None] < 1)
        kept = sorted_probs.masked_fill(drop, 0.0)
        probs[rows] = torch.zeros_like(kept).scatter_(-1, order, kept / kept.sum(-1, keepdim=True))
    else:
        probs[rows] = scaled.softmax(-1)
    return probs


def penalize(logits: torch.Tensor, counts: torch.Tensor, prompt: torch.Tensor, presence: torch.Tensor,
             frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Penalized logits, vLLM's order. `counts`: how often each token occurs among the generated ones,
    `prompt`: which occur in the prompt (both broadcast against `logits`); the settings broadcast too.
    Repetition (HF's): a token seen in the prompt or the output has its logit divided by the penalty
    when positive, multiplied when not; then frequency x count and presence (once) are subtracted for
    the generated tokens. Neutral settings (1, 0, 0) leave every logit exactly as it was."""
    seen = prompt | (counts > 0)
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


class SlotPenalties:
    """Each slot's penalty settings and token counts, on the device, for a batch whose rows are slots.

    `counts[s]` counts the tokens slot s generated so far, `prompt[s]` marks its prompt's tokens; the
    settings are (slots, 1, 1) so they broadcast over a step's (rows, width, vocab) logits. A slot whose
    settings are neutral is never recorded: its stale counts are multiplied by zero."""

    def __init__(self, slots: int, vocab: int, device):
        self.counts = torch.zeros((slots, vocab), dtype=torch.float32, device=device)
        self.prompt = torch.zeros((slots, vocab), dtype=torch.bool, device=device)
        self.presence = torch.zeros((slots, 1, 1), dtype=torch.float32, device=device)
        self.frequency = torch.zeros((slots, 1, 1), dtype=torch.float32, device=device)
        self.repetition = torch.ones((slots, 1, 1), dtype=torch.float32, device=device)

    def start(self, slot: int, sampling: Sampling, prompt: Sequence[int]) -> None:
        """A new sequence in `slot`: its settings, no generated tokens, its prompt's tokens."""
        self.presence[slot] = sampling.presence_penalty
        self.frequency[slot] = sampling.frequency_penalty
        self.repetition[slot] = sampling.repetition_penalty
        if sampling.penalized:
            self.counts[slot] = 0
            self.prompt[slot] = False
            self.prompt[slot, torch.as_tensor(list(prompt), device=self.prompt.device)] = True

    def record(self, slot: int, tokens: Sequence[int]) -> None:
        """Tokens slot `slot` generated (the caller skips slots whose settings are neutral)."""
        ids = torch.as_tensor(list(tokens), device=self.counts.device)
        self.counts[slot].index_put_((ids,), torch.ones(len(ids), device=self.counts.device), accumulate=True)

    def rows(self, logits: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """(rows, vocab) logits of the given slots (an eager forward's), penalized."""
        index = torch.as_tensor(list(slots), device=logits.device)
        return penalize(logits, self.counts[index], self.prompt[index], self.presence[index, 0],
                        self.frequency[index, 0], self.repetition[index, 0])


@dataclass(frozen=True)
class TokenLogprob:
    """A token's raw log-probability where it was chosen (or read, for a prompt token) and the `top` most
    likely tokens there, best first, as (id, log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def pick_logprobs(logprobs: torch.Tensor, tokens: Sequence[int], tops: Sequence[int]) -> list[TokenLogprob]:
    """Row i of (rows, vocab) log-probabilities: token `tokens[i]`'s and the `tops[i]` best; one transfer."""
    chosen = logprobs.gather(1, torch.as_tensor(list(tokens), device=logprobs.device)[:, None])[:, 0].tolist()
    k = max(tops, default=0)
    values, ids = logprobs.topk(k, -1) if k else (logprobs[:, :0], logprobs[:, :0])
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(token, lp, tuple(zip(ids[i][:top], values[i][:top])))
            for i, (token, lp, top) in enumerate(zip(tokens, chosen, tops))]


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a (vocab,) distribution by inverse CDF: one uniform from `generator`."""
    cdf = probs.cumsum(-1)
    u = torch.rand((), generator=generator, device=probs.device) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True))
    return min(index, int(probs.nonzero()[-1]))


def pick(probs: torch.Tensor, setting: Sampling, generator: torch.Generator) -> int:
    """The next token from a row of `probabilities`: the argmax when greedy (no draw), else a draw."""
    return int(probs.argmax()) if setting.greedy else draw(probs, generator)


def accept_greedy(drafts: Sequence[int], choices: Sequence[int]) -> tuple[list[int], int]:
    """Greedy verification: `choices` are the target's argmax after the last token and after each
    draft; keep the drafts while they agree, then the target's own token."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
        accepted += 1
    return list(drafts[:accepted]) + [choices[accepted]], accepted


def accept_drafts(target: torch.Tensor, drafts: Sequence[int], proposal: torch.Tensor | None,
                  generator: torch.Generator) -> tuple[list[int], int]:
    """Verify drafted tokens of a sampled sequence (greedy ones: `accept_greedy`); returns (the tokens to
    append, how many drafts were accepted).

    `target` (len(drafts) + 1, vocab): the target's distributions after the last token and after
    each draft. `proposal` (len(drafts), vocab): the distributions the drafts were drawn from, or
    None for a deterministic proposer (prompt lookup: the proposal is one-hot on the draft).
    Draft i is accepted with probability min(1, p(d)/q(d)); at the first rejection the token comes
    from the residual max(0, p - q), renormalised; if all are accepted one more comes from p.
    """
    for i, token in enumerate(drafts):
        p = target[i]
        q_token = 1.0 if proposal is None else float(proposal[i, token])
        u = float(torch.rand((), generator=generator, device=p.device))
        if not (q_token > 0 and u * q_token < float(p[token])):
            residual = p.clone()
            if proposal is None:
                residual[token] = 0.0
            else:
                residual = (residual - proposal[i]).clamp_(min=0.0)
            if float(residual.sum()) <= 0:  # p == q: nothing to correct, any draw from p is right
                residual = p
            return list(drafts[:i]) + [draw(residual, generator)], i
    return list(drafts) + [draw(target[len(drafts)], generator)], len(drafts)
