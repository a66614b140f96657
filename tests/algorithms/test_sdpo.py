"""SDPO's choice of the sibling each rollout's teacher sees, against hand-worked groups."""

import torch

from rlsd_megatron.algorithms import select_sdpo_demonstrations


def test_select_sdpo_demonstrations_hand_case():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.2, 0.0, 0.0])
    # Group 0: successes at 0 and 2. Each rollout takes the first success that is not itself.
    assert select_sdpo_demonstrations(rewards, 4) == [2, 0, 0, 0, None, None, None, None]
    assert select_sdpo_demonstrations(rewards, 4, exclude_self=False)[:4] == [0, 0, 0, 0]
    # Shortest successful sibling when lengths are given: len(0) = 9 > len(2) = 3.
    lengths = torch.tensor([9, 5, 3, 7, 1, 1, 1, 1])
    assert select_sdpo_demonstrations(rewards, 4, lengths=lengths)[:4] == [2, 2, 0, 2]
    # Threshold: 0.2 succeeds at threshold 0.1 → rollout 5's siblings use it, rollout 5 has none.
    assert select_sdpo_demonstrations(rewards, 4, success_threshold=0.1)[4:] == [5, None, 5, 5]
