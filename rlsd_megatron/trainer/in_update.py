"""The student's log-probs taken from the update's own forward (`train.student_log_probs_in_update`).

With one optimizer step per rollout batch, the "old" log-probs of the ratio are the current
policy's, and the update's forward computes exactly those (same weights, same micro-batches) before
its backward changes anything. So the score phase need not run the student at all (for RLSD that
halves it: only the teacher's forward is left): the loss takes `logp.detach()` as the old
log-probs, and everything else the step derived from them is per token, so it is computed inside
the loss on each micro-batch from fields that do not depend on the student:
- the token advantages (`objectives.token_advantages`: RLSD's teacher weights from Δ = log π_T −
  log π_S, OPD's log-ratio, sampled distillation) from the sequence advantage and the teacher's
  log-probs;
- the TIS weights and the engine mismatch from the engine's log-probs.
Their logged metrics become means over micro-batches (identical with one micro-batch per rank).
"""

from __future__ import annotations

import torch

from rlsd_megatron import algorithms as alg
from rlsd_megatron.config import Config
from rlsd_megatron.trainer import objectives
from rlsd_megatron.trainer.rollouts import Rollouts, response_tensors


def student_free_fields(rollouts: Rollouts, seq_adv: torch.Tensor, teacher_logp: list[torch.Tensor] | None,
                        has_teacher: list[bool] | None) -> dict[str, list[torch.Tensor]]:
    """Per-token fields of each student sequence (aligned as `Rollouts.on_sequences`, 0 on the
    prompt) from which `student_dependent_fields` rebuilds what the student's log-probs give:
    `seq_adv` (the sequence advantage [P·G] on every response token), `engine_logp`, and when the
    method reads the teacher `teacher_logp` and `has_teacher` (1 where the sample has a teacher)."""
    width = max((len(r) for r in rollouts.responses), default=0)
    ones = rollouts.padded_response_mask().float()
    fields = {"seq_adv": rollouts.on_sequences(seq_adv.float()[:, None] * ones),
              "engine_logp": rollouts.on_sequences(response_tensors(rollouts.engine_log_probs, width))}
    if teacher_logp is not None:
        fields["teacher_logp"] = rollouts.on_sequences(response_tensors(teacher_logp, width))
    if has_teacher is not None:
        fields["has_teacher"] = rollouts.on_sequences(torch.tensor(has_teacher).float()[:, None] * ones)
    return fields


def _per_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] the value of each row's first masked position (the field is constant there); 0 for a
    row without one. Exact, unlike a mean."""
    first = mask.float().argmax(dim=1)
    picked = values.gather(1, first[:, None])[:, 0]
    return torch.where(mask.any(dim=1), picked, torch.zeros_like(picked))


def student_dependent_fields(cfg: Config, step: int, logp: torch.Tensor, fields: dict[str, torch.Tensor],
                             mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Inside the loss: `old_logp`, `advantages` and (with `algorithm.tis_cap`) `tis_weight`, all
    [B, S] like `logp` (this micro-batch's log-probs of its targets under the current weights),
    and the metrics the separate score phase would log (the method's advantage metrics, the
    engine mismatch as `rollout/logprob_mismatch_mean` / `_max` of this micro-batch). `fields` holds
    `student_free_fields`' entries for this micro-batch; `mask` [B, S] bool the loss mask."""
    a = cfg.algorithm
    student = logp.detach()
    teacher = fields["teacher_logp"].to(student) if "teacher_logp" in fields else None
    teacher_rows = _per_row(fields["has_teacher"].to(student.device), mask).bool() if "has_teacher" in fields else None
    advantages = objectives.token_advantages(a, step, _per_row(fields["seq_adv"].to(student.device), mask), mask,
                                             student, teacher, teacher_mask=teacher_rows)
    derived = {"old_logp": student, "advantages": advantages.values}
    engine = fields["engine_logp"].to(student)
    if a.tis_cap:
        derived["tis_weight"] = alg.tis_weights(student, engine, mask, cap=a.tis_cap)
    gap = (student.double() - engine.double()).abs()[mask]
    metrics = {**advantages.metrics,
               "rollout/logprob_mismatch_mean": float(gap.mean()) if gap.numel() else 0.0,
               "rollout/logprob_mismatch_max": float(gap.max()) if gap.numel() else 0.0}
    return derived, metrics

