"""Sampling for a batch of sequences, each with its own settings and random stream.

`Sampling` is one request's settings; `probabilities` turns a batch of logits rows into the
distributions those settings define (temperature, top-k, top-p: the nucleus filter renormalised),
temperature 0 being the one-hot argmax. A row's random draws come from its own `torch.Generator`,
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

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

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
