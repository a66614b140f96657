"""SDPO's teacher demonstration: which successful sibling's response each rollout's teacher sees.

The teacher's context itself (the sibling's text in the user turn) is prompt templating:
`rlsd_megatron.data.teacher_context.TeacherContextBuilder.build_sdpo`.
"""

from __future__ import annotations

import torch

__all__ = ["select_sdpo_demonstrations"]


def select_sdpo_demonstrations(rewards: torch.Tensor, group_size: int, *, success_threshold: float = 0.5,
                               exclude_self: bool = True,
                               lengths: torch.Tensor | None = None) -> list[int | None]:
    """For each rollout, the flat index of the sibling whose text the SDPO teacher sees, or None.

    ``rewards`` is flat ``[B]``, group-contiguous. A sibling qualifies when its reward is
    ``>= success_threshold`` (official SDPO: 0.5) and, with ``exclude_self`` (official
    ``dont_reprompt_on_self_success``), it is not the rollout itself. Picks the first qualifying
    sibling (official SDPO; rollouts are i.i.d. so that is a random one), or the shortest when
    ``lengths`` ``[B]`` is given (the RLSD paper's SDPO run).
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be flat [P * group_size]; got shape {tuple(rewards.shape)} "
                         f"with group_size={group_size}.")
    ok = (rewards >= success_threshold).tolist()
    lens = lengths.tolist() if lengths is not None else None
    picks: list[int | None] = []
    for i in range(rewards.numel()):
        start = i - i % group_size
        candidates = [j for j in range(start, start + group_size) if ok[j] and not (exclude_self and j == i)]
        if not candidates:
            picks.append(None)
        else:
            picks.append(min(candidates, key=lambda j: (lens[j], j)) if lens is not None else candidates[0])
    return picks
