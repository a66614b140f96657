"""Advantages: GRPO / Dr.GRPO per-sequence, RLSD and OPD per-token.

Everything here is pure tensor math on one batch: no process groups, no config objects.
Shapes: ``B`` rollouts (flat and group-contiguous: the G rollouts of prompt 0, then those of
prompt 1, ...), ``T`` response positions. Masks are 1/True on real response tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlsd_megatron.algorithms._tensors import at_least_float32, bool_mask

__all__ = [
    "RLSDTokenWeights",
    "group_advantages",
    "opd_token_advantages",
    "rlsd_lambda",
    "rlsd_token_advantages",
    "rlsd_token_weights",
]


def _check_seq_adv(seq_adv: torch.Tensor, token_tensor: torch.Tensor) -> None:
    if seq_adv.dim() != 1 or token_tensor.dim() != 2 or seq_adv.shape[0] != token_tensor.shape[0]:
        raise ValueError(f"seq_adv must be [B] and the per-token tensors [B, T]; got seq_adv "
                         f"{tuple(seq_adv.shape)} and {tuple(token_tensor.shape)}.")


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


def rlsd_lambda(step: int, *, lam0: float = 0.5, decay_steps: int | None = 60, warmup_steps: int = 0) -> float:
    """RLSD mixing weight λ_s at update ``step`` (counted from 1), spec §3 plus the authors' warm-up.

    With W = ``warmup_steps`` and D = ``decay_steps``::

        λ_s = λ0 · s / W                        for s < W      (linear warm-up from 0)
        λ_s = λ0 · max(0, 1 − (s − W) / D)      for s ≥ W      (linear decay, counted from W)

    as the authors' trainer computes it (``RaySimpleGRPOOPSDTrainer``: ``rlsd_lambda_warmup_steps``,
    ``rlsd_lambda_decay_steps``): λ reaches λ0 at update W and decays from there, without a
    plateau. W = 0 (their default and the recipe's) gives the spec's ``λ0 · max(0, 1 − s / D)``:
    the first update uses ``λ0·(1 − 1/D)``, λ = 0 from update D on. ``decay_steps`` None or 0
    keeps λ = λ0 after the warm-up (the reference code's ``rlsd_lambda_decay_steps=0``). D = 60
    is the recipe script's value.
    """
    if not 0.0 <= lam0 <= 1.0:
        raise ValueError(f"lam0={lam0} is outside [0, 1]; λ mixes GRPO and teacher weights.")
    if step < 0:
        raise ValueError(f"step={step} is negative; updates are counted from 1.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} is negative; use 0 for no warm-up.")
    if decay_steps is not None and decay_steps < 0:
        raise ValueError(f"decay_steps={decay_steps} is negative; use None or 0 for no decay.")
    if step < warmup_steps:
        return float(lam0) * step / warmup_steps
    if not decay_steps:
        return float(lam0)
    return float(lam0) * max(0.0, 1.0 - (step - warmup_steps) / decay_steps)


class RLSDTokenWeights(NamedTuple):
    """Per-token RLSD evidence, all ``[B, T]`` float32 and detached.

    ``delta`` is Δ_t (0 on masked positions), ``weight`` the unclipped w_t and ``clipped``
    ŵ_t (both 1 on masked positions, the neutral value).
    """

    delta: torch.Tensor
    weight: torch.Tensor
    clipped: torch.Tensor


def rlsd_token_weights(seq_adv: torch.Tensor, teacher_logp: torch.Tensor, student_logp: torch.Tensor,
                       mask: torch.Tensor, *, clip_eps: float = 0.2) -> RLSDTokenWeights:
    """RLSD token weights (spec §3), the part of Â worth logging on its own.

    ``Δ_t = sg(log π_T(y_t|x,r,y_<t) − log π_S(y_t|x,y_<t))``, ``w_t = exp(sign(A)·Δ_t)``,
    ``ŵ_t = clip(w_t, 1 − ε, 1 + ε)``. ``seq_adv`` is ``[B]``; log-probs (of the sampled
    tokens, temperature-scaled like the rollout) and ``mask`` are ``[B, T]``. sign(0) = 0, so a
    zero-advantage rollout gets w = 1. Masked positions are neutralised with ``where`` rather
    than multiplication, so garbage (even ±inf) in padded log-probs never leaks.
    """
    _check_seq_adv(seq_adv, teacher_logp)
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(f"teacher_logp {tuple(teacher_logp.shape)} and student_logp "
                         f"{tuple(student_logp.shape)} must both be [B, T].")
    if clip_eps < 0:
        raise ValueError(f"clip_eps={clip_eps} must be >= 0.")
    valid = bool_mask(mask, teacher_logp)
    diff = at_least_float32(teacher_logp.detach()) - at_least_float32(student_logp.detach())
    delta = torch.where(valid, diff, torch.zeros_like(diff))
    sign = torch.sign(at_least_float32(seq_adv.detach())).unsqueeze(1)
    weight = torch.where(valid, torch.exp(sign * delta), torch.ones_like(delta))
    clipped = weight.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return RLSDTokenWeights(delta=delta, weight=weight, clipped=clipped)


def rlsd_token_advantages(seq_adv: torch.Tensor, teacher_logp: torch.Tensor, student_logp: torch.Tensor,
                          mask: torch.Tensor, *, lam: float, clip_eps: float = 0.2,
                          negative_only: bool = False) -> torch.Tensor:
    """RLSD per-token advantage ``Â_t = A · [(1 − λ) + λ·ŵ_t]``, detached, ``[B, T]`` float32.

    ŵ_t is :func:`rlsd_token_weights`'s clipped weight, so Â_t has the sign of A and
    ``|A|(1 − λε) ≤ |Â_t| ≤ |A|(1 + λε)``; λ = 0 is exactly GRPO's ``A`` on every token.
    ``negative_only`` reweights failed rollouts (A < 0) only: the others keep ``Â_t = A``
    (the authors' ``rlsd_negative_only``: blame is redistributed, credit is not).
    ``seq_adv`` ``[B]``, the rest ``[B, T]``; masked positions are 0.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam} is outside [0, 1]; compute it with rlsd_lambda(step).")
    weights = rlsd_token_weights(seq_adv, teacher_logp, student_logp, mask, clip_eps=clip_eps)
    valid = bool_mask(mask, teacher_logp)
    seq_adv = at_least_float32(seq_adv.detach()).unsqueeze(1)
    reweight = (1.0 - lam) + lam * weights.clipped
    if negative_only:
        reweight = torch.where(seq_adv < 0, reweight, torch.ones_like(reweight))
    adv = seq_adv * reweight
    return torch.where(valid, adv, torch.zeros_like(adv))


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
        _check_seq_adv(seq_adv, teacher_logp)
        adv = adv + reward_weight * at_least_float32(seq_adv.detach()).unsqueeze(1)
    return torch.where(valid, adv, torch.zeros_like(adv))
