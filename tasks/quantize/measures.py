"""Quantization quality the way llama.cpp's perplexity tool reports it (`--kl-divergence`).

Text is cut into chunks of `n_ctx` tokens; each chunk starts with BOS (replacing its first token)
and only its second half is scored, so every scored token has at least n_ctx/2 tokens of context.
At each scored position the quantized model's next-token distribution Q is compared with the
reference P (fp32 ours): PPL(Q)/PPL(P), mean KL(P‖Q), how often both put the same token on top,
and the RMS of the change in the correct token's probability; each with llama.cpp's uncertainty
estimate (`mean_and_uncertainty`, `covariance` in tools/perplexity/perplexity.cpp).

Two deliberate differences, both in the reference's favour of exactness: P's log-probabilities are
kept in fp32 (llama.cpp stores them as 16-bit codes to fit a file), and the KL sum runs over the
whole vocabulary (llama.cpp skips tokens with log P < -16 for speed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def chunk(row: np.ndarray | list[int], n_ctx: int, bos_id: int) -> tuple[list[int], int]:
    """(the chunk's tokens with BOS first, index of the first scored position). Positions
    first .. n_ctx-2 are scored: logits there predict tokens first+1 .. n_ctx-1."""
    tokens = [int(t) for t in row[:n_ctx]]
    if len(tokens) < 4:
        raise ValueError(f"a chunk needs at least 4 tokens, got {len(tokens)}")
    tokens[0] = bos_id
    return tokens, len(tokens) // 2


@dataclass
class KlStats:
    """Running sums over scored positions (llama.cpp's `kl_divergence_result`)."""

    count: int = 0
    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    max_kld: float = 0.0
    n_same_top: int = 0

    def add(self, base_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """base_logits, logits: (n, vocab) at n scored positions; targets: (n,) the tokens that follow."""
        if base_logits.shape != logits.shape or logits.shape[0] != targets.shape[0]:
            raise ValueError(f"shapes differ: base {tuple(base_logits.shape)}, quantized {tuple(logits.shape)}, "
                             f"targets {tuple(targets.shape)}")
        logp_base = torch.log_softmax(base_logits.double(), dim=-1)
        logp = torch.log_softmax(logits.double(), dim=-1)
        index = targets.long()[:, None]
        nll = -logp.gather(1, index).squeeze(1)
        nll_base = -logp_base.gather(1, index).squeeze(1)
        kld = (logp_base.exp() * (logp_base - logp)).sum(-1)
        p_diff = torch.exp(-nll) - torch.exp(-nll_base)
        self.count += int(targets.shape[0])
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float((nll * nll).sum())
        self.sum_nll_base += float(nll_base.sum())
        self.sum_nll_base2 += float((nll_base * nll_base).sum())
        self.sum_nll_nll_base += float((nll * nll_base).sum())
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())
        self.sum_p_diff += float(p_diff.sum())
        self.sum_p_diff2 += float((p_diff ** 2).sum())
        self.sum_p_diff4 += float((p_diff ** 4).sum())
        self.max_kld = max(self.max_kld, float(kld.max()))
        self.n_same_top += int((logits.argmax(-1) == base_logits.argmax(-1)).sum())

    def summary(self) -> dict:
        """llama.cpp's final "Perplexity / KL divergence / Token probability statistics", as numbers."""
        if self.count < 2:
            raise ValueError(f"too few scored tokens ({self.count}) for statistics")
        log_ppl, log_ppl_unc = _mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count)
        log_base, log_base_unc = _mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, self.count)
        cov = _covariance(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, self.count)
        ln_ratio = log_ppl - log_base
        ln_ratio_unc = math.sqrt(max(0.0, log_ppl_unc ** 2 + log_base_unc ** 2 - 2 * cov))
        kld, kld_unc = _mean_and_uncertainty(self.sum_kld, self.sum_kld2, self.count)
        p_diff_mse, p_diff_mse_unc = _mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, self.count)
        rms = math.sqrt(p_diff_mse)
        same = self.n_same_top / self.count
        return {
            "tokens": self.count,
            "ppl": math.exp(log_ppl),
            "ppl_base": math.exp(log_base),
            "ppl_ratio": math.exp(ln_ratio),
            "ppl_ratio_unc": math.exp(ln_ratio) * ln_ratio_unc,
            "ln_ppl_ratio": ln_ratio,
            "kld": kld,
            "kld_unc": kld_unc,
            "kld_max": self.max_kld,
            "rms_dp": rms,
            "rms_dp_unc": 0.5 / rms * p_diff_mse_unc if rms > 0 else 0.0,
            "same_top": same,
            "same_top_unc": math.sqrt(same * (1 - same) / (self.count - 1)),
        }


def _mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    mean = total / count
    var = total2 / count - mean * mean
    return mean, math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0


def _covariance(total_a: float, total_b: float, total_ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (total_ab / count - (total_a / count) * (total_b / count)) / (count - 1)
