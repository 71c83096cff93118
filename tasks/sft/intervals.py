"""95% intervals for chat accuracies, alone and paired, so a reader can tell a change from noise.

- `wilson`: the Wilson score interval of k right of n (good near 0% and 100% and at small n, unlike
  p ± 1.96·se). The questions of one column share facts (several wordings per fact), so the interval
  is somewhat narrower than the truth; it is the usual convention and compares like with like.
- `paired`: two models on the same questions. Only the discordant questions carry information: b
  (first right, second wrong) and c (first wrong, second right). The difference (c - b) / n gets the
  paired Wald interval and McNemar's exact two-sided p-value (binomial on b + c trials at 1/2).
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        raise ValueError(f"n: must be > 0, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct: must be within 0..{n}, got {correct}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided p-value that b and c discordant outcomes came from a fair coin."""
    trials = b + c
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, i) for i in range(min(b, c) + 1)) / 2 ** trials
    return min(1.0, 2 * tail)


def paired(first: str, second: str, z: float = Z95) -> dict:
    """`first`, `second`: one '1'/'0' per question (right/wrong), in the same question order.
    {"n", "b", "c", "diff" (second - first), "ci95": [lo, hi], "p_mcnemar"}."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired: answers of {len(first)} and {len(second)} questions (need the same, > 0)")
    n = len(first)
    b = sum(x == "1" and y == "0" for x, y in zip(first, second))
    c = sum(x == "0" and y == "1" for x, y in zip(first, second))
    diff = (c - b) / n
    half = z * math.sqrt(max(0.0, b + c - (c - b) ** 2 / n)) / n
    return {"n": n, "b": b, "c": c, "diff": diff, "ci95": [diff - half, diff + half], "p_mcnemar": mcnemar_p(b, c)}
