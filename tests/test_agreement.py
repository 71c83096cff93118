"""tests/agreement.py, the cross-engine rule, can fail: on a real difference, not on a near-tie."""

import pytest
import torch
from agreement import assert_logits_agree


def test_a_near_tie_may_flip_within_the_tolerance_a_real_difference_may_not():
    ours = torch.tensor([[5.0, 1.0, 0.0], [2.0, 1.99, 0.0], [0.0, 3.0, 1.0]])
    near_tie_flipped = ours + torch.tensor([[0.01, 0.0, 0.0], [-0.01, 0.01, 0.0], [0.0, 0.0, 0.01]])
    assert assert_logits_agree(ours, near_tie_flipped, atol=0.02) == 2  # the tie is not compared
    with pytest.raises(AssertionError, match="differ by up to 4"):
        assert_logits_agree(ours, ours + torch.tensor([[0.0, 4.5, 0.0], [0.0] * 3, [0.0] * 3]), atol=0.02)
    with pytest.raises(AssertionError, match="only 0/3 positions"):
        assert_logits_agree(ours, ours, atol=2.0)
