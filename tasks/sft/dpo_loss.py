"""The DPO objective (Rafailov et al. 2023) and the numbers TRL's DPOTrainer logs about it.

With policy π, frozen reference π_ref (the SFT model), a prompt x and completions y_w (chosen)
and y_l (rejected), each scored by its summed token log-probability:

    h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))
    sigmoid: −log σ(β·h)              (the paper's loss; with label smoothing ε, cDPO:
                                        −(1−ε)·log σ(β·h) − ε·log σ(−β·h))
    hinge:   max(0, 1 − β·h)          (SLiC)
    ipo:     (h − 1/(2β))²            (Azar et al.; on per-token *average* log-probs, as TRL does)

The implicit rewards are β·(log π − log π_ref) of each completion; `rewards/accuracies` is the
fraction of pairs whose chosen reward is the larger, `rewards/margins` their mean difference.
`rpo_alpha` > 0 adds α × the chosen completions' mean token NLL (TRL's `rpo_alpha`, RPO: Pang et al.
2024), which keeps DPO from lowering the likelihood of the chosen answers along with the rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses, chosen rewards and rejected rewards (rewards detached), all shape (pairs,).
    Inputs are sequence log-probabilities (sums, or per-token means for ipo)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logprobs(token_logprobs: torch.Tensor, targets: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(sequences,) summed (or, `average`, mean) log-probability of each row's target tokens (-100: not one)."""
    valid = targets != -100
    total = (token_logprobs * valid).sum(-1)
    return total / valid.sum(-1).clamp(min=1) if average else total


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen: torch.Tensor,
                   policy_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the pairs (the loop averages them over every pair of the step), TRL's names."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "logps/chosen": policy_chosen.detach().sum(),
        "logps/rejected": policy_rejected.detach().sum(),
    }


def preference_loss(policy_tokens: torch.Tensor, reference_tokens: torch.Tensor, targets: torch.Tensor, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                    rpo_alpha: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's loss from per-token log-probs of (2·pairs, seq) rows, chosen rows first, and
    its metrics as means over the pairs (TRL's names; `nll_loss` with rpo_alpha)."""
    average = loss_type == "ipo"
    policy = sequence_logprobs(policy_tokens, targets, average)
    reference = sequence_logprobs(reference_tokens, targets, average)
    pairs = len(policy) // 2
    losses, chosen_rewards, rejected_rewards = dpo_losses(policy[:pairs], policy[pairs:], reference[:pairs],
                                                          reference[pairs:], beta, loss_type, label_smoothing)
    metrics = {name: value / pairs for name, value in
               reward_metrics(chosen_rewards, rejected_rewards, policy[:pairs], policy[pairs:]).items()}
    loss = losses.mean()
    if rpo_alpha:
        valid = targets[:pairs] != -100
        nll = -(policy_tokens[:pairs] * valid).sum() / valid.sum().clamp(min=1)
        metrics["nll_loss"] = nll.detach()
        loss = loss + rpo_alpha * nll
    return loss, metrics
