"""Per-method glue between the algorithm math and the learner: token advantages and the loss.

Every method runs the same step; the config decides
- which sequence advantage (`group_advantages`, with or without std: GRPO / Dr.GRPO),
- which token advantage: the sequence advantage broadcast (grpo, dapo, drgrpo, grpo_opsd),
  RLSD's teacher-weighted one (rlsd), OPD's teacher − student log-ratio (opd), none (opsd, sdpo:
  distillation only),
- and the loss: the clipped surrogate (`policy_loss`) plus optional KL and entropy terms, all
  normalised by global counts so micro-batching and data parallelism do not change the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlsd_megatron import algorithms as alg
from rlsd_megatron.config import AlgorithmConfig, Config

TEACHER_LOGPROB_METHODS = ("rlsd", "opd")  # the teacher's log-prob of each sampled token
DISTILL_METHODS = ("opsd", "sdpo", "grpo_opsd")  # the teacher's distribution at each token


def uses_teacher_log_probs(cfg: AlgorithmConfig) -> bool:
    return cfg.method in TEACHER_LOGPROB_METHODS


def uses_distillation(cfg: AlgorithmConfig) -> bool:
    return cfg.method in DISTILL_METHODS


@dataclass
class TokenAdvantages:
    values: torch.Tensor  # [B, T] response-aligned, 0 on masked positions
    metrics: dict[str, float]


def token_advantages(cfg: AlgorithmConfig, step: int, seq_adv: torch.Tensor, mask: torch.Tensor,
                     student_logp: torch.Tensor | None = None, teacher_logp: torch.Tensor | None = None
                     ) -> TokenAdvantages:
    """Per-token advantages for one batch of responses ([B, T] tensors, `mask` 1 on response
    tokens) at update `step` (from 1)."""
    mask = mask.bool()
    metrics: dict[str, float] = {}
    if cfg.method == "rlsd":
        lam = alg.rlsd_lambda(step, lam0=cfg.lam0, decay_steps=cfg.lam_decay_steps)
        weights = alg.rlsd_token_weights(seq_adv, teacher_logp, student_logp, mask, clip_eps=cfg.weight_clip_eps)
        values = alg.rlsd_token_advantages(seq_adv, teacher_logp, student_logp, mask, lam=lam,
                                           clip_eps=cfg.weight_clip_eps)
        n = mask.sum().clamp_min(1)
        success = (seq_adv > 0)[:, None] & mask
        failure = (seq_adv < 0)[:, None] & mask
        metrics.update({
            "rlsd/lambda": lam,
            "rlsd/delta_mean": float((weights.delta * mask).sum() / n),
            "rlsd/delta_success": float((weights.delta * success).sum() / success.sum().clamp_min(1)),
            "rlsd/delta_failure": float((weights.delta * failure).sum() / failure.sum().clamp_min(1)),
            "rlsd/weight_mean": float((weights.clipped * mask).sum() / n),
            "rlsd/weight_clipped_frac": float(((weights.weight != weights.clipped) & mask).sum() / n),
        })
    elif cfg.method == "opd":
        values = alg.opd_token_advantages(teacher_logp, student_logp, mask, seq_adv=seq_adv,
                                          reward_weight=cfg.opd_reward_weight)
        # log π_S − log π_T of the sampled tokens: a one-sample estimate of KL(π_S‖π_T), which OPD minimises.
        metrics["opd/reverse_kl"] = float(((student_logp - teacher_logp) * mask).sum() / mask.sum().clamp_min(1))
    elif cfg.method in ("grpo", "dapo", "drgrpo", "grpo_opsd"):
        values = seq_adv[:, None].float() * mask
    else:  # opsd, sdpo: the distillation loss carries the signal
        values = torch.zeros(mask.shape)
    return TokenAdvantages(values.detach(), metrics)


def sequence_advantages(cfg: Config, rewards: torch.Tensor) -> torch.Tensor:
    """GRPO's group-normalised advantage (std division off for Dr.GRPO)."""
    return alg.group_advantages(rewards, cfg.rollout.n, normalize_std=cfg.algorithm.normalize_adv_std)


def distillation_per_token(cfg: Config, logits: torch.Tensor, teacher_logits: torch.Tensor,
                           targets: torch.Tensor) -> torch.Tensor:
    """Per-token distillation divergence toward the (detached) teacher, by `algorithm.distill_loss`:
    full-vocabulary JSD_β (OPSD), a top-k support (SDPO: the student's top-k + tail bucket), or
    the sampled token only (KL estimate log π_S(y) − log π_T(y))."""
    from rlsd_megatron import ops

    a = cfg.algorithm
    common = dict(temperature=cfg.rollout.temperature, vocab_size=cfg.model.vocab_size)
    teacher_logits = teacher_logits.detach().to(logits.dtype)
    if a.distill_loss == "jsd":
        return ops.generalized_jsd(logits, teacher_logits, beta=a.distill_beta, **common)
    if a.distill_loss == "topk":
        return ops.topk_distillation_loss(logits, teacher_logits, a.distill_topk, support=a.distill_support,
                                          divergence="jsd", beta=a.distill_beta, tail_bucket=a.distill_tail_bucket,
                                          **common)
    student = ops.token_log_probs(logits, targets, **common)
    teacher = ops.token_log_probs(teacher_logits, targets, **common)
    return student - teacher.detach()


def policy_loss_fn(cfg: Config, normalisers: dict[str, torch.Tensor]):
    """The learner's loss. Micro-batch fields (shifted, aligned with the logits): `old_logp`,
    `advantages`, `loss_mask`, optional `ref_logp` (KL), `tis_weight`, and for distillation
    methods `teacher_logits` ([B, S, V/TP]) with `distill_mask`. The clipped surrogate is used
    by every method but OPSD and SDPO; distillation methods add `distill_coef` × the
    aggregated divergence. `normalisers` are the *global* counts (`loss_normalisers` summed
    over all micro-batches and data-parallel ranks)."""
    from rlsd_megatron.ops import token_log_probs

    a = cfg.algorithm
    use_surrogate = a.method not in ("opsd", "sdpo")
    norm_constant = None
    if a.loss_agg == "seq-mean-token-sum-norm":
        norm_constant = float(a.loss_norm_constant or cfg.rollout.max_new_tokens)
    aggregation = dict(agg=a.loss_agg, norm_constant=norm_constant, **normalisers)

    def loss_fn(logits: torch.Tensor, mb) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fields = mb.fields
        mask = fields["loss_mask"].to(logits.device)
        logp, entropy = token_log_probs(logits, mb.targets.to(logits.device), temperature=cfg.rollout.temperature,
                                        vocab_size=cfg.model.vocab_size, return_entropy=True)
        if use_surrogate:
            loss, metrics = alg.policy_loss(
                logp, fields["old_logp"].to(logp), fields["advantages"].to(logp), mask,
                clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip,
                is_weights=fields["tis_weight"].to(logp) if "tis_weight" in fields else None,
                **aggregation,
            )
        else:
            loss, metrics = logp.new_zeros(()), {}
        if "teacher_logits" in fields:
            distill_mask = fields["distill_mask"].to(logp)
            divergence = distillation_per_token(cfg, logits, fields["teacher_logits"].to(logits.device),
                                                mb.targets.to(logits.device))
            loss = loss + a.distill_coef * alg.aggregate_loss(divergence * distill_mask, mask, **aggregation)
            metrics["distill"] = _masked_mean(divergence, distill_mask)
        if a.kl_coef:
            kl = alg.kl_penalty(logp, fields["ref_logp"].to(logp), a.kl_kind)
            loss = loss + a.kl_coef * alg.aggregate_loss(kl, mask, **aggregation)
            metrics["kl"] = _masked_mean(kl, mask)
        if a.entropy_coef:
            loss = loss - a.entropy_coef * alg.aggregate_loss(entropy, mask, **aggregation)
        metrics["entropy"] = _masked_mean(entropy, mask)
        return loss, metrics

    return loss_fn


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """This micro-batch's mean over masked tokens (for logging; the learner averages these)."""
    mask = mask.to(values.dtype)
    return (values.detach() * mask).sum() / mask.sum().clamp_min(1)
