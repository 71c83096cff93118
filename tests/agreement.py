"""The one rule for comparing two engines or two precisions (ours vs llama.cpp, ours vs transformers,
fp32 vs F16): logits within a stated tolerance, and the same top token wherever the top-2 margin is
wide enough that no difference within that tolerance could swap them.

Exact equality of greedy tokens across engines is a coin toss at near-ties: kernels differ per CPU
(AVX2 vs AVX-512), llama.cpp rounds activations to F16, and one flipped token sends the continuations
apart. So both engines score the *same* token sequence (teacher forcing), and a test fails only when the
logits really differ, or a decisive top token does.
"""

from __future__ import annotations

import torch


def assert_logits_agree(ours: torch.Tensor, theirs: torch.Tensor, atol: float, what: str = "",
                        min_decisive: float = 0.5) -> int:
    """`ours` and `theirs`: logits [positions, vocab] for the same tokens. Every logit within `atol`; at each
    position where our top-2 margin exceeds 2·atol (the widest gap two logits each off by atol can close),
    the same argmax. At least `min_decisive` of the positions must be decisive, or the test would prove
    nothing. Returns the number of decisive positions."""
    ours, theirs = ours.float(), theirs.float()
    assert ours.shape == theirs.shape, f"{what}: shapes differ: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    worst = (ours - theirs).abs().max().item()
    assert worst <= atol, f"{what}: logits differ by up to {worst:.3g} (tolerance {atol:g})"
    top2 = ours.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * atol
    count = int(decisive.sum())
    assert count >= min_decisive * len(ours), \
        f"{what}: only {count}/{len(ours)} positions have a top-2 margin over {2 * atol:g}: nothing to compare"
    flipped = (ours.argmax(-1) != theirs.argmax(-1)) & decisive
    where = flipped.nonzero().flatten().tolist()
    assert not where, f"{what}: a different top token at decisive positions {where}"
    return count
