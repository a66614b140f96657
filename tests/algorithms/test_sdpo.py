"""SDPO's choice of the siblings each rollout's teacher sees, against hand-worked groups."""

import pytest
import torch

from rlsd_megatron.algorithms import select_sdpo_demonstrations, select_sdpo_paper_demonstrations


def test_select_sdpo_demonstrations_hand_case():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.2, 0.0, 0.0])
    # Group 0: successes at 0 and 2. Each rollout takes the first success that is not itself.
    assert select_sdpo_demonstrations(rewards, 4) == [2, 0, 0, 0, None, None, None, None]
    assert select_sdpo_demonstrations(rewards, 4, exclude_self=False)[:4] == [0, 0, 0, 0]
    # Threshold: 0.2 succeeds at threshold 0.1 → rollout 5's siblings use it, rollout 5 has none.
    assert select_sdpo_demonstrations(rewards, 4, success_threshold=0.1)[4:] == [5, None, 5, 5]


def test_paper_demonstrations_are_the_shortest_correct_and_incorrect_sibling():
    # Group 0: correct {0 (9 tokens), 2 (3)}, incorrect {1 (5), 3 (5)}: a tie, the earlier one wins
    # (the authors' argmin). Group 1: nothing reaches 0.5, so no correct sibling anywhere.
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.1, 0.0, 0.0, 0.2, 0.0])
    lengths = torch.tensor([9, 5, 3, 5, 4, 2, 2, 7])
    picks = select_sdpo_paper_demonstrations(rewards, lengths, 4, success_threshold=0.5)
    assert picks[:4] == [(2, 1), (2, 3), (0, 1), (2, 1)]  # never the rollout itself
    assert picks[4:] == [(None, 5), (None, 6), (None, 5), (None, 5)]
    # At threshold 0.1 rollout 6 (0.2) is group 1's only correct one: itself it sees no correct sibling.
    picks = select_sdpo_paper_demonstrations(rewards, lengths, 4, success_threshold=0.1)
    assert picks[4:] == [(6, 5), (6, 4), (None, 5), (6, 5)]
    # Every sibling correct: no incorrect one; ties broken by position. A group of one: nothing.
    assert select_sdpo_paper_demonstrations(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3, 3, 3]), 3,
                                            success_threshold=0.5) == [(1, None), (0, None), (0, None)]
    assert select_sdpo_paper_demonstrations(torch.tensor([1.0]), torch.tensor([3]), 1,
                                            success_threshold=0.5) == [(None, None)]


def test_paper_demonstrations_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"lengths \(3,\) must match rewards \(4,\)"):
        select_sdpo_paper_demonstrations(torch.zeros(4), torch.ones(3), 2, success_threshold=0.5)
    with pytest.raises(ValueError, match="rewards must be flat"):
        select_sdpo_paper_demonstrations(torch.zeros(3), torch.ones(3), 2, success_threshold=0.5)
