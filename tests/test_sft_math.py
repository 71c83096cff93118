"""The math of alignment training, against direct computations: per-token log-probs (values and
gradients), the DPO losses and their gradients from the formulas, packed attention equal to each
sequence alone, and the packing / padding of sequences into rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import micro
from model.llama import Llama, packed_attention_mask
from model.loss import IGNORE_INDEX, linear_token_logprobs
from tasks.sft.dpo_loss import dpo_losses, preference_loss, reward_metrics, sequence_logprobs
from tasks.sft.rows import pack, pad
from tasks.sft.sequences import Sequence

pytestmark = pytest.mark.usefixtures("single_thread")


def test_token_logprobs_and_their_gradients_equal_a_full_log_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    targets[0, :3] = IGNORE_INDEX
    upstream = torch.randn(18, dtype=torch.float64)

    ours = linear_token_logprobs(hidden, weight, targets, chunk=4)  # several chunks, a ragged last one
    (ours * upstream).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logp = F.log_softmax(hidden @ weight.t(), dim=-1).reshape(-1, 50)
    valid = targets.reshape(-1) != IGNORE_INDEX
    direct = logp.gather(1, targets.reshape(-1, 1).clamp(min=0)).squeeze(1) * valid
    (direct * upstream).sum().backward()
    torch.testing.assert_close(ours.double(), direct, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-6, atol=1e-6)
    assert (ours[:3] == 0).all()


def _direct_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * torch.log(torch.sigmoid(beta * h)) - eps * torch.log(torch.sigmoid(-beta * h))
    if loss_type == "hinge":
        return torch.clamp(1 - beta * h, min=0)
    return (h - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_loss_and_gradient_equal_the_formula(loss_type, eps):
    torch.manual_seed(1)
    policy = torch.randn(2, 6, dtype=torch.float64) * 5
    reference = torch.randn(2, 6, dtype=torch.float64) * 5
    beta = 0.3
    ours_in = policy.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_losses(ours_in[0], ours_in[1], reference[0], reference[1],
                                                          beta, loss_type, eps)
    losses.mean().backward()
    direct_in = policy.clone().requires_grad_()
    direct = _direct_dpo(direct_in[0], direct_in[1], reference[0], reference[1], beta, loss_type, eps)
    direct.mean().backward()
    torch.testing.assert_close(losses, direct)
    torch.testing.assert_close(ours_in.grad, direct_in.grad)
    torch.testing.assert_close(chosen_rewards, beta * (policy[0] - reference[0]))
    torch.testing.assert_close(rejected_rewards, beta * (policy[1] - reference[1]))


def test_sigmoid_dpo_gradient_has_the_papers_closed_form():
    """d/dθ of −log σ(βh) is −β σ(−βh) ∇h: the weight σ(−βh) is large where the model ranks wrongly."""
    pc, pr = torch.tensor([-3.0, -1.0], requires_grad=True), torch.tensor([-2.0, -4.0], requires_grad=True)
    rc, rr, beta = torch.tensor([-2.5, -2.0]), torch.tensor([-2.5, -2.0]), 0.5
    losses, _, _ = dpo_losses(pc, pr, rc, rr, beta)
    losses.sum().backward()
    h = (pc - rc) - (pr - rr)
    weight = torch.sigmoid(-beta * h).detach()
    torch.testing.assert_close(pc.grad, -beta * weight)
    torch.testing.assert_close(pr.grad, beta * weight)


def test_reward_metrics_are_trls():
    chosen, rejected = torch.tensor([0.2, -0.1, 0.4]), torch.tensor([0.1, 0.3, -0.2])
    m = reward_metrics(chosen, rejected, torch.tensor([-5.0, -6, -7]), torch.tensor([-8.0, -9, -1]))
    assert m["rewards/accuracies"].item() == 2 and m["rewards/margins"].item() == pytest.approx(0.3)
    assert m["logps/chosen"].item() == -18 and m["logps/rejected"].item() == -18


def test_a_micro_batch_of_pairs_with_rpo_equals_the_direct_formula():
    """Rows: 2 chosen then 2 rejected; loss = mean sigmoid DPO + α × mean NLL of the chosen tokens."""
    torch.manual_seed(3)
    targets = torch.tensor([[5, 6, -100], [7, 8, 9], [5, 4, -100], [1, -100, -100]])
    policy = (torch.randn(4, 3, dtype=torch.float64) - 2).masked_fill(targets == -100, 0).requires_grad_()
    reference = (torch.randn(4, 3, dtype=torch.float64) - 2).masked_fill(targets == -100, 0)
    loss, metrics = preference_loss(policy, reference, targets, beta=0.2, rpo_alpha=0.5)
    loss.backward()
    direct_in = policy.detach().clone().requires_grad_()
    valid = targets != -100
    seq, ref = (direct_in * valid).sum(-1), reference.sum(-1)
    h = (seq[:2] - ref[:2]) - (seq[2:] - ref[2:])
    direct = -torch.log(torch.sigmoid(0.2 * h)).mean() + 0.5 * -(direct_in[0, :2].sum() + direct_in[1].sum()) / 5
    direct.backward()
    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(policy.grad, direct_in.grad)
    torch.testing.assert_close(metrics["rewards/margins"], (0.2 * h).mean().detach())
    assert metrics["rewards/accuracies"].item() == (h > 0).double().mean().item()


def test_sequence_logprobs_sum_or_average_the_learned_tokens():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]])
    targets = torch.tensor([[5, 6, -100], [7, -100, -100]])
    assert sequence_logprobs(logps, targets).tolist() == [-3.0, -4.0]
    assert sequence_logprobs(logps, targets, average=True).tolist() == [-1.5, -4.0]


# ---------------------------------------------------------------- packing


def _sequence(ids, learn_from):
    ids = np.asarray(ids)
    return Sequence(ids, np.arange(len(ids)) >= learn_from)


def test_packed_rows_compute_what_each_sequence_computes_alone():
    torch.manual_seed(2)
    model = Llama(micro()).eval()
    sequences = [_sequence(np.random.default_rng(i).integers(3, 500, size=n), 2) for i, n in enumerate((9, 14, 5, 7))]
    rows = pack(sequences, 24)
    assert len(rows) == 2 and rows.lengths.tolist() == [21, 10]  # segments 13 + 8, then 6 + 4
    with torch.no_grad():
        packed = model(torch.from_numpy(rows.inputs).long(), positions=torch.from_numpy(rows.positions).long())
        for sequence in sequences:
            alone = model(torch.from_numpy(sequence.ids[:-1]).long()[None])[0]
            n = len(sequence.ids) - 1
            found = [(r, c) for r in range(len(rows)) for c in range(24 - n + 1)
                     if np.array_equal(rows.inputs[r, c:c + n], sequence.ids[:-1]) and rows.positions[r, c] == 0]
            assert len(found) == 1
            r, c = found[0]
            torch.testing.assert_close(packed[r, c:c + n], alone, rtol=1e-4, atol=1e-4)


def test_packed_mask_is_block_diagonal_and_causal():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = packed_attention_mask(positions)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                    [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]


def test_packing_is_best_fit_decreasing_and_targets_only_learned_tokens():
    """Segments of 6, 4, 3, 2, 1 positions into rows of 8: 6 opens row 0, 4 opens row 1, 3 fits row 1
    best (4 free), 2 fills row 0, 1 fills row 1: two full rows."""
    sequences = [_sequence([100 * k + i for i in range(n)], 1) for k, n in enumerate((7, 5, 4, 3, 2), 1)]
    rows = pack(sequences, 8)
    members = [sorted({int(x) // 100 for x in rows.inputs[r]}) for r in range(len(rows))]
    assert members == [[1, 4], [2, 3, 5]] and rows.lengths.tolist() == [8, 8]
    assert rows.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert rows.learned_tokens == sum(len(s.ids) - 1 for s in sequences)
    assert (rows.targets[0, :6] == np.arange(101, 107)).all()  # each segment predicts its next ids

    padded = pad(sequences, 8)
    assert len(padded) == 5 and padded.lengths.tolist() == [6, 4, 3, 2, 1]
    assert (padded.targets[0, 6:] == IGNORE_INDEX).all() and padded.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]


def test_prompt_tokens_are_never_targets():
    rows = pad([_sequence([1, 50, 51, 52, 53], 3)], 6)  # learn ids from index 3 on
    assert rows.targets[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 52, 53, IGNORE_INDEX, IGNORE_INDEX]


def test_pack_refuses_a_sequence_longer_than_a_row():
    with pytest.raises(ValueError, match="does not fit rows of 4"):
        pack([_sequence(range(10), 1)], 4)
