"""Group (GRPO / Dr.GRPO) and OPD advantages: hand-computed values from the spec."""

import math

import pytest
import torch

from rlsd_megatron.algorithms import group_advantages, opd_token_advantages

TOL = dict(rtol=0, atol=1e-6)  # float32 arithmetic on O(1) values


def test_group_advantages_hand_values():
    # Group 0 [1, 0, 0, 0]: mean 0.25, centred [0.75, -0.25, -0.25, -0.25],
    #   unbiased var (0.5625 + 3·0.0625)/3 = 0.25 → std 0.5 → A = centred / 0.500001.
    # Group 1 [1, 1, 0, 0]: mean 0.5, var 4·0.25/3 = 1/3 → std 0.577350 → A = ±0.5/0.577351.
    # Group 2 all 0.9: A = 0.
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 0.9, 0.9, 0.9, 0.9])
    s1 = math.sqrt(1 / 3) + 1e-6
    expected = torch.tensor([0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001,
                             0.5 / s1, 0.5 / s1, -0.5 / s1, -0.5 / s1, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(rewards, 4), expected, **TOL)


def test_group_advantages_drgrpo_no_std():
    # Dr.GRPO: A = R − mean. [1, 0, 0, 0] → [0.75, −0.25, −0.25, −0.25]; [2, 4] → [−1, 1].
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, normalize_std=False),
                               torch.tensor([0.75, -0.25, -0.25, -0.25]), **TOL)
    torch.testing.assert_close(group_advantages(torch.tensor([2.0, 4.0]), 2, normalize_std=False),
                               torch.tensor([-1.0, 1.0]), **TOL)


def test_all_equal_group_is_exactly_zero_despite_float_rounding():
    # In float32, mean([0.1]*8) != 0.1 (off by 7.45e-9) and std is ~8e-9, so the naive
    # (R − mean)/(std + 1e-6) gives −0.0074 for a formatted-but-wrong group (0.9·0 + 0.1·1).
    rewards = torch.full((8,), 0.1)
    naive = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    assert naive.abs().max() > 1e-3  # the pitfall is real
    assert torch.equal(group_advantages(rewards, 8), torch.zeros(8))
    assert torch.equal(group_advantages(rewards, 8, normalize_std=False), torch.zeros(8))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="not divisible"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="flat"):
        group_advantages(torch.zeros(2, 4), 4)


def test_opd_token_advantages_hand_values():
    teacher = torch.tensor([[-0.5, -2.0, 0.0]])
    student = torch.tensor([[-1.0, -1.0, -torch.inf]])
    mask = torch.tensor([[True, True, False]])
    # A_t = teacher − student = [0.5, −1.0], padding 0.
    torch.testing.assert_close(opd_token_advantages(teacher, student, mask), torch.tensor([[0.5, -1.0, 0.0]]), **TOL)
    # With reward mixing, c = 0.1 and A = 2: [0.5 + 0.2, −1.0 + 0.2] = [0.7, −0.8].
    mixed = opd_token_advantages(teacher, student, mask, seq_adv=torch.tensor([2.0]), reward_weight=0.1)
    torch.testing.assert_close(mixed, torch.tensor([[0.7, -0.8, 0.0]]), **TOL)
    with pytest.raises(ValueError, match="needs seq_adv"):
        opd_token_advantages(teacher, student, mask, reward_weight=0.1)
