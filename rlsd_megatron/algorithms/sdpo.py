"""SDPO's teacher demonstrations: which siblings' responses each rollout's teacher sees.

Two choices (`algorithm.sdpo_demonstrations`): official SDPO's one successful sibling
(:func:`select_sdpo_demonstrations`), or the RLSD paper's SDPO run's shortest correct and shortest
incorrect sibling (:func:`select_sdpo_paper_demonstrations`). The teacher's context itself (the
siblings' text in the user turn) is prompt templating:
`rlsd_megatron.data.teacher_context.TeacherContextBuilder.build_sdpo` / `build_sdpo_paper`.
"""

from __future__ import annotations

import torch

__all__ = ["select_sdpo_demonstrations", "select_sdpo_paper_demonstrations"]


def _siblings(rewards: torch.Tensor, group_size: int, exclude_self: bool) -> list[list[int]]:
    """Per rollout, the flat indices of its group (without itself when ``exclude_self``)."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be flat [P * group_size]; got shape {tuple(rewards.shape)} "
                         f"with group_size={group_size}.")
    return [[j for j in range(i - i % group_size, i - i % group_size + group_size) if not (exclude_self and j == i)]
            for i in range(rewards.numel())]


def select_sdpo_demonstrations(rewards: torch.Tensor, group_size: int, *, success_threshold: float = 0.5,
                               exclude_self: bool = True) -> list[int | None]:
    """For each rollout, the flat index of the sibling whose text the SDPO teacher sees, or None.

    ``rewards`` is flat ``[B]``, group-contiguous. A sibling qualifies when its reward is
    ``>= success_threshold`` (official SDPO: 0.5) and, with ``exclude_self`` (official
    ``dont_reprompt_on_self_success``), it is not the rollout itself. Picks the first qualifying
    sibling (official SDPO; rollouts are i.i.d. so that is a random one).
    """
    ok = (rewards >= success_threshold).tolist()
    return [next((j for j in group if ok[j]), None) for group in _siblings(rewards, group_size, exclude_self)]


def select_sdpo_paper_demonstrations(rewards: torch.Tensor, lengths: torch.Tensor, group_size: int, *,
                                     success_threshold: float) -> list[tuple[int | None, int | None]]:
    """For each rollout, ``(correct, incorrect)``: the flat indices of its shortest correct and its
    shortest incorrect sibling, each None when the other siblings have none of that kind.

    The RLSD paper's SDPO run (iie-ycx/RLSD ``RayOPSDTrainer._select_sdpo_feedback``): a response
    is correct at reward ``>= success_threshold``, else incorrect; "shortest" is the fewest response
    tokens (``lengths`` ``[B]``), ties going to the earlier one (their ``argmin``). The authors draw
    a separate pool of candidates per prompt, independent of the rollout being scored; here the
    pool is the rollout's siblings, the rollout itself excluded so that its teacher never reads it.
    """
    if lengths.shape != rewards.shape:
        raise ValueError(f"lengths {tuple(lengths.shape)} must match rewards {tuple(rewards.shape)}.")
    ok, lens = (rewards >= success_threshold).tolist(), lengths.tolist()

    def shortest(candidates: list[int]) -> int | None:
        return min(candidates, key=lambda j: (lens[j], j)) if candidates else None

    return [(shortest([j for j in group if ok[j]]), shortest([j for j in group if not ok[j]]))
            for group in _siblings(rewards, group_size, exclude_self=True)]
