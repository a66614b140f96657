"""Per-method glue between the algorithm math and the learner: token advantages and the loss.

Every method runs the same step; its record (`algorithms/methods.py`) and the config decide
- which sequence advantage (`group_advantages`, with or without std: GRPO / Dr.GRPO),
- which token advantage (`Method.token_advantage`): the sequence advantage broadcast (grpo, dapo,
  drgrpo, grpo_opsd), RLSD's teacher-weighted one (rlsd), OPD's teacher − student log-ratio
  (opd), none (opsd, sdpo: distillation only); with `distill_loss=sampled` the distillation
  methods add the sampled-token reverse-KL advantage `distill_coef · (log π_T − log π_S)` instead
  of a loss on the logits,
- and the loss: the clipped surrogate (`policy_loss`) plus optional distillation, KL and entropy
  terms, all normalised by global counts so micro-batching and data parallelism do not change
  the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlsd_megatron import algorithms as alg
from rlsd_megatron.algorithms.methods import get_method
from rlsd_megatron.config import AlgorithmConfig, Config

DISTRIBUTION_LOSSES = ("jsd", "topk")  # distillation losses on the teacher's distribution at each token


def uses_sampled_distillation(cfg: AlgorithmConfig) -> bool:
    """The distillation term is a policy-gradient advantage on the sampled tokens (`distill_loss=sampled`)."""
    return get_method(cfg.method).distills and cfg.distill_loss == "sampled"


def uses_teacher_log_probs(cfg: AlgorithmConfig) -> bool:
    """The step needs the teacher's log-prob of each sampled token (RLSD, OPD, sampled distillation)."""
    return get_method(cfg.method).reads_teacher_log_probs or uses_sampled_distillation(cfg)


def uses_distillation(cfg: AlgorithmConfig) -> bool:
    """The step needs the teacher's logits at each token (a distillation loss on distributions)."""
    return get_method(cfg.method).distills and cfg.distill_loss in DISTRIBUTION_LOSSES


def uses_surrogate(cfg: AlgorithmConfig) -> bool:
    """The loss has the clipped policy-gradient surrogate: every method whose token advantages
    are not all zero (OPSD and SDPO only with sampled distillation)."""
    return get_method(cfg.method).surrogate or uses_sampled_distillation(cfg)


@dataclass
class TokenAdvantages:
    """One step's token advantages and what their method logs about them."""

    values: torch.Tensor  # [B, T] response-aligned, 0 on masked positions
    metrics: dict[str, float]


def token_advantages(cfg: AlgorithmConfig, step: int, seq_adv: torch.Tensor, mask: torch.Tensor,
                     student_logp: torch.Tensor | None = None, teacher_logp: torch.Tensor | None = None,
                     teacher_mask: torch.Tensor | None = None) -> TokenAdvantages:
    """Per-token advantages for one batch of responses ([B, T] tensors, `mask` 1 on response
    tokens) at update `step` (from 1). `teacher_mask` [B] (bool) marks the samples that have a
    teacher (an SDPO sample without a successful sibling has none); None: all."""
    mask = mask.bool()
    metrics: dict[str, float] = {}
    kind = get_method(cfg.method).token_advantage
    if kind == "rlsd":
        values, metrics = alg.rlsd_advantages_and_metrics(
            seq_adv, teacher_logp, student_logp, mask, step=step, lam0=cfg.lam0, decay_steps=cfg.lam_decay_steps,
            warmup_steps=cfg.lam_warmup_steps, clip_eps=cfg.weight_clip_eps, negative_only=cfg.negative_only)
    elif kind == "opd":
        values = alg.opd_token_advantages(teacher_logp, student_logp, mask, seq_adv=seq_adv,
                                          reward_weight=cfg.opd_reward_weight)
        # log π_S − log π_T of the sampled tokens: a one-sample estimate of KL(π_S‖π_T), which OPD minimises.
        metrics["opd/reverse_kl"] = float(((student_logp - teacher_logp) * mask).sum() / mask.sum().clamp_min(1))
    elif kind == "sequence":
        values = seq_adv[:, None].float() * mask
    else:  # none (opsd, sdpo): the distillation term carries the signal
        values = torch.zeros(mask.shape)
    if uses_sampled_distillation(cfg):
        # The sampled-token form of KL(π_S‖π_T) must be a policy-gradient term: the pathwise gradient
        # of log π_S(y) on the student's own samples has zero expectation. Per token, as OPD's
        # (spec §6): its expected gradient is that of the per-token reverse KL on the sampled prefixes.
        distill_mask = mask & teacher_mask.bool()[:, None] if teacher_mask is not None else mask
        log_ratio = alg.opd_token_advantages(teacher_logp, student_logp, distill_mask)  # log π_T − log π_S
        values = values + cfg.distill_coef * log_ratio
        n = distill_mask.sum().clamp_min(1)
        metrics["distill/sampled_kl"] = float(-log_ratio.sum() / n)  # k1 estimate of the per-token KL(π_S‖π_T)
        metrics["distill/sampled_abs_log_ratio"] = float(log_ratio.abs().sum() / n)
    return TokenAdvantages(values.detach(), metrics)


def sequence_advantages(cfg: Config, rewards: torch.Tensor) -> torch.Tensor:
    """GRPO's group-normalised advantage (std division off for Dr.GRPO)."""
    return alg.group_advantages(rewards, cfg.rollout.n, normalize_std=cfg.algorithm.normalize_adv_std)


def distillation_per_token(cfg: Config, logits: torch.Tensor, teacher_logits: torch.Tensor,
                           targets: torch.Tensor) -> torch.Tensor:
    """Per-token distillation divergence toward the (detached) teacher, by `algorithm.distill_loss`:
    full-vocabulary JSD_β (OPSD) or a top-k support (SDPO: the student's top-k + tail bucket).
    `distill_loss=sampled` is no loss on the logits but a token advantage (`token_advantages`)."""
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
    raise ValueError(f"algorithm.distill_loss={a.distill_loss!r} is not a loss on the teacher's logits (those are "
                     f"{list(DISTRIBUTION_LOSSES)}); sampled distillation enters through token_advantages")


def policy_loss_fn(cfg: Config, normalisers: dict[str, torch.Tensor], *,
                   distill_normalisers: dict[str, torch.Tensor] | None = None, step: int | None = None):
    """The learner's loss. Micro-batch fields (shifted, aligned with the logits): `old_logp`,
    `advantages`, `loss_mask`, optional `ref_logp` (KL), `tis_weight`, and for distillation
    methods with a loss on distributions `teacher_logits` ([B, S, V/TP]) with `distill_mask`.
    The clipped surrogate is used by every method but OPSD and SDPO (there, only with sampled
    distillation, whose signal is in `advantages`); jsd / topk add `distill_coef` × the
    divergence aggregated over the tokens of `distill_mask`. `normalisers` are the *global*
    counts of `loss_mask` (`loss_normalisers` summed over all micro-batches and data-parallel
    ranks), `distill_normalisers` those of `distill_mask` (needed with `teacher_logits`, and for
    OPSD / SDPO with sampled distillation, whose surrogate then runs over `distill_mask`): the
    distillation is a mean over the tokens that have a teacher, as official SDPO's loss mask
    `response_mask · self_distillation_mask` (an SDPO sample without a successful sibling
    neither adds to the sum nor dilutes it). With `train.student_log_probs_in_update` the
    fields hold `in_update.student_free_fields` instead of `old_logp` / `advantages` / `tis_weight`,
    which are derived from this forward's log-probs (`step`: the update, from 1, for RLSD's λ)."""
    from rlsd_megatron.ops import token_log_probs
    from rlsd_megatron.trainer.in_update import student_dependent_fields

    a = cfg.algorithm
    use_surrogate = uses_surrogate(a)
    # OPSD / SDPO with sampled distillation: the surrogate carries the distillation alone, so like the
    # divergence it is a mean over the tokens that have a teacher (`distill_mask`; see above).
    surrogate_on_teacher_tokens = uses_sampled_distillation(a) and not get_method(a.method).surrogate
    norm_constant = None
    if a.loss_agg == "seq-mean-token-sum-norm":
        norm_constant = float(a.loss_norm_constant or cfg.rollout.max_new_tokens)

    def aggregation_over(counts: dict[str, torch.Tensor]) -> dict:
        return dict(agg=a.loss_agg, norm_constant=norm_constant, **counts)

    aggregation = aggregation_over(normalisers)

    def loss_fn(logits: torch.Tensor, mb) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fields = mb.fields
        mask = fields["loss_mask"].to(logits.device)
        logp, entropy = token_log_probs(logits, mb.targets.to(logits.device), temperature=cfg.rollout.temperature,
                                        vocab_size=cfg.model.vocab_size, return_entropy=True)
        derived_metrics = {}
        if "seq_adv" in fields:
            derived, derived_metrics = student_dependent_fields(cfg, step, logp, fields, mask.bool())
            fields = {**fields, **derived}
        if use_surrogate:
            on, counts = mask, normalisers
            if surrogate_on_teacher_tokens:
                on, counts = fields["distill_mask"].to(logits.device), _distill_counts(distill_normalisers)
            loss, metrics = alg.policy_loss(
                logp, fields["old_logp"].to(logp), fields["advantages"].to(logp), on,
                clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip,
                is_weights=fields["tis_weight"].to(logp) if "tis_weight" in fields else None,
                **aggregation_over(counts),
            )
        else:
            loss, metrics = logp.new_zeros(()), {}
        if "teacher_logits" in fields:
            distill_mask = fields["distill_mask"].to(logp)
            divergence = distillation_per_token(cfg, logits, fields["teacher_logits"].to(logits.device),
                                                mb.targets.to(logits.device))
            loss = loss + a.distill_coef * alg.aggregate_loss(
                divergence, distill_mask, **aggregation_over(_distill_counts(distill_normalisers)))
            metrics["distill"] = _masked_mean(divergence, distill_mask)
        if a.kl_coef:
            kl = alg.kl_penalty(logp, fields["ref_logp"].to(logp), a.kl_kind)
            loss = loss + a.kl_coef * alg.aggregate_loss(kl, mask, **aggregation)
            metrics["kl"] = _masked_mean(kl, mask)
        if a.entropy_coef:
            loss = loss - a.entropy_coef * alg.aggregate_loss(entropy, mask, **aggregation)
        metrics["entropy"] = _masked_mean(entropy, mask)
        return loss, {**metrics, **derived_metrics}

    return loss_fn


def _distill_counts(distill_normalisers: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    if distill_normalisers is None:
        raise ValueError("a distillation term needs distill_normalisers: the global counts of distill_mask")
    return distill_normalisers


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """This micro-batch's mean over masked tokens (for logging; the learner averages these)."""
    mask = mask.to(values.dtype)
    return (values.detach() * mask).sum() / mask.sum().clamp_min(1)
