"""Advantages: GRPO / Dr.GRPO per-sequence, OPD per-token (RLSD's per-token ones: `rlsd.py`).

Everything here is pure tensor math on one batch: no process groups, no config objects.
Shapes: ``B`` rollouts (flat and group-contiguous: the G rollouts of prompt 0, then those of
prompt 1, ...), ``T`` response positions. Masks are 1/True on real response tokens.
"""

from __future__ import annotations

import torch

from rlsd_megatron.algorithms._tensors import at_least_float32, bool_mask, check_seq_adv

__all__ = ["group_advantages", "opd_token_advantages"]


def group_advantages(rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-sequence GRPO advantage ``A_i = (R_i - mean_g R) / (std_g R + eps)``.

    ``rewards`` is flat ``[B]``, group-contiguous, ``B = P * group_size``; the std is the
    unbiased one (spec §1). ``normalize_std=False`` gives Dr.GRPO's ``A_i = R_i - mean_g R``.
    Groups whose rewards are all equal get exactly 0 (not ``rounding_error / eps``, which a
    float mean of equal values can otherwise produce). Returns float32 ``[B]``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be flat [B]; got shape {tuple(rewards.shape)}.")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: GRPO needs at least 2 rollouts per prompt "
                         "to form a baseline.")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards are not divisible into groups of "
                         f"{group_size}; the batch must hold whole groups, group-contiguous.")
    grouped = at_least_float32(rewards.detach()).reshape(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    adv = centered / (grouped.std(dim=1, correction=1, keepdim=True) + eps) if normalize_std else centered
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(adv), adv).reshape(-1)


def opd_token_advantages(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor, *,
                         seq_adv: torch.Tensor | None = None, reward_weight: float = 0.0) -> torch.Tensor:
    """On-policy distillation advantage ``A_t = sg(log π_T(y_t) − log π_S(y_t)) + c · A_i``.

    The first term is the per-token negative reverse KL (its policy gradient minimises
    KL(π_S‖π_T) on the student's own samples, spec §6 OPD); ``c = reward_weight`` optionally
    adds the verifiable-reward advantage ``seq_adv`` ``[B]`` (e.g. from
    :func:`group_advantages`) to every token, the usual "KL as a dense reward" mix.
    Log-probs and ``mask`` are ``[B, T]``; returns detached float32 ``[B, T]``, 0 where masked.
    """
    if teacher_logp.shape != student_logp.shape or teacher_logp.dim() != 2:
        raise ValueError(f"teacher_logp {tuple(teacher_logp.shape)} and student_logp "
                         f"{tuple(student_logp.shape)} must both be [B, T].")
    valid = bool_mask(mask, teacher_logp)
    adv = at_least_float32(teacher_logp.detach()) - at_least_float32(student_logp.detach())
    if reward_weight != 0.0:
        if seq_adv is None:
            raise ValueError(f"reward_weight={reward_weight} needs seq_adv (the [B] verifiable-"
                             "reward advantage); pass seq_adv or set reward_weight=0.")
        check_seq_adv(seq_adv, teacher_logp)
        adv = adv + reward_weight * at_least_float32(seq_adv.detach()).unsqueeze(1)
    return torch.where(valid, adv, torch.zeros_like(adv))
