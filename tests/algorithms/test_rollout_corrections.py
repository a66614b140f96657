"""Dynamic sampling, soft overlong penalty and TIS weights."""

import math

import pytest
import torch

from rlsd_megatron.algorithms import dynamic_sampling_keep_mask, soft_overlong_penalty, tis_weights

TOL = dict(rtol=0, atol=1e-6)


def test_dynamic_sampling_drops_all_equal_groups():
    rewards = torch.tensor([1.0, 0, 1, 1, 0.9, 0.9, 0.9, 0.9, 0, 0, 0, 0.1])
    assert dynamic_sampling_keep_mask(rewards, 4).tolist() == [True, False, True]
    # Equal within float rounding is still "equal" only if bit-identical: group of 0.1s from one formula.
    assert dynamic_sampling_keep_mask(torch.full((8,), 0.1), 8).tolist() == [False]
    with pytest.raises(ValueError, match="group_size"):
        dynamic_sampling_keep_mask(rewards, 5)


def test_soft_overlong_penalty_hand_values():
    # max 20, buffer 8, factor 0.5 → E = 12: L ≤ 12 → 0; 13 → 0.5·(12−13)/8 = −0.0625;
    # 16 → 0.5·(−4/8) = −0.25; 20 → −0.5; 25 (beyond max) → −0.5.
    lengths = torch.tensor([10, 12, 13, 16, 20, 25])
    out = soft_overlong_penalty(lengths, max_length=20, buffer=8, factor=0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.0625, -0.25, -0.5, -0.5]), **TOL)
    # Recipe: max 16384, buffer 3072, factor 0.1, responses ≤ 4096 → never fires.
    recipe = soft_overlong_penalty(torch.tensor([1, 4096]), max_length=16384, buffer=3072, factor=0.1)
    assert torch.equal(recipe, torch.zeros(2))
    # With max 4096: L = 4096 − 3072 + 1536 = 2560 → 0.1·(−1536/3072) = −0.05.
    assert soft_overlong_penalty(torch.tensor([2560]), max_length=4096, buffer=3072, factor=0.1).item() == \
        pytest.approx(-0.05, abs=1e-7)
    with pytest.raises(ValueError, match="buffer"):
        soft_overlong_penalty(lengths, max_length=20, buffer=0, factor=0.5)


def test_tis_weights_hand_values():
    train = torch.tensor([[-1.0, -1.0, -3.0, -torch.inf]])
    rollout = torch.tensor([[-1.5, -0.5, -0.1, -torch.inf]])
    mask = torch.tensor([[True, True, True, False]])
    # exp(train − rollout) = exp([0.5, −0.5, −2.9]) = [1.648721, 0.606531, 0.055023]; cap 1.5.
    out = tis_weights(train, rollout, mask, cap=1.5)
    torch.testing.assert_close(out, torch.tensor([[1.5, math.exp(-0.5), math.exp(-2.9), 0.0]]), **TOL)
    train.requires_grad_()
    assert not tis_weights(train, rollout, mask, cap=1.5).requires_grad
    # A huge gap saturates at the cap, never inf/nan.
    assert tis_weights(torch.tensor([[0.0]]), torch.tensor([[-1e4]]), torch.ones(1, 1), cap=2.0).item() == 2.0
