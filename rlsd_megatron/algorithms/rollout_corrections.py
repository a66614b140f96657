"""Rollout-side corrections: DAPO dynamic sampling and overlong shaping, and truncated
importance sampling for the train/rollout log-prob mismatch (its metric, reduced over
data-parallel ranks, is `rlsd_megatron.rollout.mismatch.logprob_mismatch`).

Pure tensor functions; shapes as in :mod:`rlsd_megatron.algorithms.advantages`.
"""

from __future__ import annotations

import math

import torch

from rlsd_megatron.algorithms._tensors import at_least_float32, bool_mask

__all__ = ["dynamic_sampling_keep_mask", "soft_overlong_penalty", "tis_weights"]


def dynamic_sampling_keep_mask(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which prompt groups DAPO's dynamic sampling keeps: those whose rewards are not all equal.

    ``rewards`` is flat ``[B]``, group-contiguous with ``B = P * group_size``; returns bool
    ``[P]`` (True = keep). An all-equal group has zero GRPO advantage and no gradient, so DAPO
    drops it and re-samples until the batch is full. For a per-rollout mask use
    ``keep.repeat_interleave(group_size)``. Equality is exact, like the advantage's.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be flat [P * group_size]; got shape {tuple(rewards.shape)} "
                         f"with group_size={group_size}.")
    grouped = rewards.reshape(-1, group_size)
    return ~(grouped == grouped[:, :1]).all(dim=1)


def soft_overlong_penalty(response_lengths: torch.Tensor, *, max_length: int, buffer: int,
                          factor: float) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the reward (spec §1, DAPO eq. 13).

    With ``L`` a response length and ``E = max_length − buffer``:
    ``0`` if ``L ≤ E``; ``factor · (E − L) / buffer`` if ``E < L ≤ max_length`` (linear from 0
    down to ``−factor``); ``−factor`` if ``L > max_length``. ``response_lengths`` is ``[B]``
    (any numeric dtype); returns float32 ``[B]``. Recipe: buffer 3072, factor 0.1, and
    ``max_length`` 16,384 with responses capped at 4096, so it never fires there.
    """
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"buffer={buffer} must be in (0, max_length={max_length}].")
    if factor < 0:
        raise ValueError(f"factor={factor} must be >= 0; the penalty is -factor at its worst.")
    lengths = at_least_float32(response_lengths)
    expected = float(max_length - buffer)
    ramp = ((expected - lengths) / buffer).clamp(min=-1.0, max=0.0)
    return factor * ramp


def tis_weights(train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                cap: float = 2.0) -> torch.Tensor:
    """Truncated importance-sampling weights ``min(exp(logp_train − logp_rollout), cap)``.

    Corrects for the rollout engine (vLLM/SGLang) sampling from a slightly different
    distribution than the learner computes: ``train_logp`` is the learner's log-prob of the
    sampled token before the update (π_old), ``rollout_logp`` the engine's. All ``[B, T]``;
    returns float32 ``[B, T]``, **detached** (a fixed per-token weight on the surrogate, pass
    it as ``policy_loss(..., is_weights=...)``), 0 on masked positions.
    """
    if cap <= 0:
        raise ValueError(f"cap={cap} must be > 0 (typical: 2).")
    valid = bool_mask(mask, train_logp)
    diff = at_least_float32(train_logp.detach()) - at_least_float32(rollout_logp.detach())
    # Clamp before exp so a huge gap gives `cap`, never inf * 0 = nan.
    weights = torch.exp(diff.clamp(max=math.log(cap))).clamp(max=cap)
    return torch.where(valid, weights, torch.zeros_like(weights))

