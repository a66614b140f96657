"""Clipped policy-gradient surrogate, loss aggregation and KL penalties.

Global normalisation: a step's batch is cut into micro-batches and spread over data-parallel
ranks. To make the sum of per-micro-batch gradients equal the full-batch gradient, every
micro-batch divides by the *global* normaliser (token count, or non-empty-sequence count)
instead of its own. :func:`loss_normalisers` gives a micro-batch's local counts; the trainer
sums them over all micro-batches of the step and all-reduces (SUM) them over data-parallel
ranks, then passes the totals as ``global_token_count`` / ``global_seq_count``. Summing the
resulting losses over micro-batches and ranks reproduces the full-batch loss exactly. If the
data-parallel gradient reduction *averages* (Megatron DDP does unless
``calculate_per_token_loss``), scale the loss by the data-parallel world size to undo it.
"""

from __future__ import annotations

import torch

from rlsd_megatron.algorithms._tensors import at_least_float32, bool_mask

__all__ = ["LOSS_AGGREGATIONS", "aggregate_loss", "kl_penalty", "loss_normalisers", "policy_loss"]

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl")


def _valid(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() != 2:
        raise ValueError(f"per-token values must be [B, T]; got shape {tuple(like.shape)}.")
    return bool_mask(mask, like)


def _positive(value, name: str):
    # Tensors are not checked: reading one back would stall the device every micro-batch.
    if value is not None and not isinstance(value, torch.Tensor) and value <= 0:
        raise ValueError(f"{name}={value} must be > 0; it counts the whole step's batch "
                         "(sum of loss_normalisers over micro-batches and data-parallel ranks).")
    return value


def loss_normalisers(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Local normaliser counts of one micro-batch, to be summed into the global ones.

    Returns ``{"global_token_count": Σ mask, "global_seq_count": #rows with ≥ 1 token}`` as
    int64 0-dim tensors (exact under any all-reduce) on ``mask``'s device (``mask`` is
    ``[B, T]``). Rows without tokens (padding rows added to even out micro-batches) do not count
    as sequences.
    """
    valid = mask if mask.dtype == torch.bool else mask != 0
    tokens = valid.sum(dim=-1)
    return {"global_token_count": tokens.sum(), "global_seq_count": (tokens > 0).sum()}


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, *, agg: str = "token-mean",
                   global_token_count=None, global_seq_count=None, norm_constant: float | None = None
                   ) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss ``L`` to a scalar.

    - ``token-mean``: ``Σ L·m / N_tok`` (spec §4; DAPO, RLSD).
    - ``seq-mean-token-mean``: ``Σ_i (Σ_t L·m / n_i) / N_seq`` (textbook GRPO).
    - ``seq-mean-token-sum-norm``: ``Σ L·m / (N_seq · C)`` with ``C = norm_constant``, normally
      the max response length (Dr.GRPO: no per-length division; equals token-mean when every
      response has length C, and does not change with a batch's padding).

    ``N_tok`` / ``N_seq`` are ``global_token_count`` / ``global_seq_count`` when given (see the
    module docstring), otherwise this micro-batch's own counts (non-empty rows only; at least 1).
    Masked positions never reach the sum, whatever they hold.
    """
    valid = _valid(mask, per_token)
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"agg={agg!r} is not one of {LOSS_AGGREGATIONS}.")
    _positive(global_token_count, "global_token_count")
    _positive(global_seq_count, "global_seq_count")
    values = torch.where(valid, per_token, torch.zeros_like(per_token))
    local = loss_normalisers(valid)
    if agg == "token-mean":
        denom = global_token_count if global_token_count is not None else local["global_token_count"].clamp(min=1)
        return values.sum() / denom
    seqs = global_seq_count if global_seq_count is not None else local["global_seq_count"].clamp(min=1)
    if agg == "seq-mean-token-mean":
        per_seq = values.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)
        return per_seq.sum() / seqs
    if norm_constant is None or norm_constant <= 0:
        raise ValueError(f"agg='seq-mean-token-sum-norm' needs norm_constant > 0 (got "
                         f"{norm_constant}); pass the max response length (Dr.GRPO).")
    return values.sum() / (seqs * float(norm_constant))


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, token_adv: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float | None = 3.0,
                ratio_log_clamp: float = 20.0, agg: str = "token-mean", global_token_count=None,
                global_seq_count=None, norm_constant: float | None = None,
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate of spec §4 with per-token advantages Â, aggregated by :func:`aggregate_loss`.

    ``r_t = exp(clamp(logp − old_logp, ±ratio_log_clamp))``,
    ``L_t = max(−Â_t·r_t, −Â_t·clip(r_t, 1 − clip_low, 1 + clip_high))``, and where Â_t < 0
    additionally ``L_t = min(L_t, −Â_t·dual_clip)`` (dual clip; ``None`` disables it).
    ``is_weights`` (``[B, T]``, e.g. :func:`tis_weights`) multiply ``L_t``, detached.
    All tensors are ``[B, T]``; only ``logp`` carries gradient (``old_logp``, ``token_adv``
    are detached here). Returns ``(loss, metrics)``; metrics are detached 0-dim tensors over
    this micro-batch's unmasked tokens: ``clip_frac`` (= ``clip_frac_low + clip_frac_high``,
    the tokens whose clipped branch is active), ``dual_clip_frac``, ``approx_kl`` (k3 estimate
    of KL(π_old‖π_θ), ``(r − 1) − log r``), ``ratio_mean/max/min`` and ``num_tokens``.
    """
    valid = _valid(mask, logp)
    if logp.shape != old_logp.shape or logp.shape != token_adv.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and token_adv "
                         f"{tuple(token_adv.shape)} must all be [B, T].")
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"clip_low={clip_low} must be in [0, 1) and clip_high={clip_high} >= 0.")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (it caps the loss of Â < 0 tokens "
                         "at −Â·dual_clip); use None to disable it.")
    # Zero padded positions before any arithmetic: garbage there (inf, nan) would otherwise
    # reach the backward pass as 0 * nan even though the aggregation masks it out.
    adv = at_least_float32(token_adv.detach())
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    log_ratio = at_least_float32(logp) - at_least_float32(old_logp.detach())
    log_ratio = torch.where(valid, log_ratio, torch.zeros_like(log_ratio)).clamp(-ratio_log_clamp, ratio_log_clamp)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    if dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * dual_clip), per_token)
    if is_weights is not None:
        if is_weights.shape != logp.shape:
            raise ValueError(f"is_weights {tuple(is_weights.shape)} must be [B, T] like logp.")
        per_token = per_token * at_least_float32(is_weights.detach())
    loss = aggregate_loss(per_token, valid, agg=agg, global_token_count=global_token_count,
                          global_seq_count=global_seq_count, norm_constant=norm_constant)
    with torch.no_grad():
        metrics = _surrogate_metrics(ratio, log_ratio, adv, valid, clip_low, clip_high, dual_clip)
    return loss, metrics


def _surrogate_metrics(ratio, log_ratio, adv, valid, clip_low, clip_high, dual_clip) -> dict[str, torch.Tensor]:
    n = valid.sum().float()
    zero = torch.zeros_like(ratio)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, zero).sum() / n.clamp(min=1)

    def extreme(x: torch.Tensor, fill: float, reduce) -> torch.Tensor:
        value = reduce(torch.where(valid, x, torch.full_like(x, fill)))
        return torch.where(torch.isinf(value), torch.ones_like(value), value)  # no tokens: neutral 1

    # The clipped branch wins exactly when Â·(r − clip(r)) > 0.
    clip_high_hit = ((adv > 0) & (ratio > 1.0 + clip_high)).float()
    clip_low_hit = ((adv < 0) & (ratio < 1.0 - clip_low)).float()
    # For Â < 0 the dual clip binds when −Â·C < −Â·max(r, clip(r)), i.e. max(r, clip(r)) > C.
    if dual_clip is None:
        dual_hit = zero
    else:
        effective_ratio = torch.maximum(ratio, ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
        dual_hit = ((adv < 0) & (effective_ratio > dual_clip)).float()
    return {
        "clip_frac": mean(clip_high_hit + clip_low_hit),
        "clip_frac_low": mean(clip_low_hit),
        "clip_frac_high": mean(clip_high_hit),
        "dual_clip_frac": mean(dual_hit),
        "approx_kl": mean((ratio - 1.0) - log_ratio),
        "ratio_mean": torch.where(n > 0, mean(ratio), torch.ones_like(n)),
        "ratio_max": extreme(ratio, -torch.inf, torch.amax),
        "ratio_min": extreme(ratio, torch.inf, torch.amin),
        "num_tokens": n,
    }


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(π_θ‖π_ref) from log-probs of tokens sampled from π_θ.

    With ``p = logp`` (policy, carries gradient) and ``q = ref_logp`` (reference, detached):
    ``k1 = p − q``; ``k2 = ½ (p − q)²``; ``k3 = exp(q − p) − (q − p) − 1`` (Schulman's
    unbiased, non-negative estimator); ``low_var_kl`` is veRL's stabilised k3: ``q − p``
    clamped to [−20, 20] before the exp and the result clamped to [−10, 10]. Any shape in,
    same shape out (float32); aggregate with :func:`aggregate_loss`.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KL_KINDS}.")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape.")
    p, q = at_least_float32(logp), at_least_float32(ref_logp.detach())
    if kind == "k1":
        return p - q
    if kind == "k2":
        return 0.5 * (p - q).square()
    diff = q - p
    if kind == "low_var_kl":
        diff = diff.clamp(-20.0, 20.0)
        return (torch.exp(diff) - diff - 1.0).clamp(-10.0, 10.0)
    return torch.exp(diff) - diff - 1.0
