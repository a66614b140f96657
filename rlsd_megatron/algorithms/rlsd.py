"""RLSD (spec §3): teacher-weighted token advantages Â_t = A·[(1 − λ_s) + λ_s·ŵ_t], and what it logs.

A is GRPO's group-normalised sequence advantage (`advantages.group_advantages`), ŵ_t the clipped
weight exp(sign(A)·Δ_t) of the teacher's vs the student's log-prob of each sampled token, λ_s a
linearly decaying mix: the teacher only redistributes credit between the tokens of a rollout,
never changes its sign. Pure tensor math, like the rest of `algorithms`. Shapes: ``B`` rollouts,
``T`` response positions; masks are 1/True on real response tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlsd_megatron.algorithms._tensors import at_least_float32, bool_mask, check_seq_adv

__all__ = [
    "RLSDTokenWeights",
    "rlsd_advantages_and_metrics",
    "rlsd_lambda",
    "rlsd_metrics",
    "rlsd_token_advantages",
    "rlsd_token_weights",
]


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
    check_seq_adv(seq_adv, teacher_logp)
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


def rlsd_metrics(lam: float, weights: RLSDTokenWeights, values: torch.Tensor, seq_adv: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, float]:
    """RLSD's evidence: Δ (mean, |Δ|, by outcome), ŵ, and how far Â_t = A·m_t moves from GRPO's A
    (`reweight_abs_dev`: mean |m_t − 1| over tokens of rollouts with A ≠ 0; 0 means RLSD is GRPO).
    `weights` and `values` (Â, [B, T]) as returned for `seq_adv` [B] and the bool `mask` [B, T]."""
    n = mask.sum().clamp_min(1)
    success = (seq_adv > 0)[:, None] & mask
    failure = (seq_adv < 0)[:, None] & mask
    scored = success | failure
    reweight = torch.where(scored, values / torch.where(scored, seq_adv[:, None].float(), 1.0), 1.0)
    return {
        "rlsd/lambda": lam,
        "rlsd/delta_mean": float((weights.delta * mask).sum() / n),
        "rlsd/delta_abs_mean": float((weights.delta.abs() * mask).sum() / n),
        "rlsd/delta_success": float((weights.delta * success).sum() / success.sum().clamp_min(1)),
        "rlsd/delta_failure": float((weights.delta * failure).sum() / failure.sum().clamp_min(1)),
        "rlsd/weight_mean": float((weights.clipped * mask).sum() / n),
        "rlsd/weight_clipped_frac": float(((weights.weight != weights.clipped) & mask).sum() / n),
        "rlsd/reweight_abs_dev": float(((reweight - 1).abs() * scored).sum() / scored.sum().clamp_min(1)),
    }


def rlsd_advantages_and_metrics(seq_adv: torch.Tensor, teacher_logp: torch.Tensor, student_logp: torch.Tensor,
                                mask: torch.Tensor, *, step: int, lam0: float, decay_steps: int | None,
                                warmup_steps: int, clip_eps: float, negative_only: bool
                                ) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's RLSD token advantages ([B, T], detached, 0 where masked) and `rlsd_metrics`, at
    update `step` (from 1) with the `algorithm.lam0` / `lam_*` / `weight_clip_eps` /
    `negative_only` settings. `seq_adv` [B]; the sampled tokens' log-probs and `mask` [B, T]."""
    mask = mask.bool()
    lam = rlsd_lambda(step, lam0=lam0, decay_steps=decay_steps, warmup_steps=warmup_steps)
    weights = rlsd_token_weights(seq_adv, teacher_logp, student_logp, mask, clip_eps=clip_eps)
    values = rlsd_token_advantages(seq_adv, teacher_logp, student_logp, mask, lam=lam, clip_eps=clip_eps,
                                   negative_only=negative_only)
    return values, rlsd_metrics(lam, weights, values, seq_adv, mask)
