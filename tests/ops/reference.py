"""Plain-torch references on the full (gathered) vocabulary, written independently of rlsd_megatron.ops.

Padding is handled the obvious way: drop the columns at or above ``vocab_size`` before the
softmax. Everything is computed in the input dtype upcast to at least float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _log_softmax(logits: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    z = logits[..., :vocab_size]
    z = z if z.dtype == torch.float64 else z.float()
    return torch.log_softmax(z / temperature, dim=-1)


def token_log_probs(logits, target, temperature, vocab_size):
    log_p = _log_softmax(logits, temperature, vocab_size)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1), entropy


def log_probs_at_ids(logits, ids, temperature, vocab_size):
    return _log_softmax(logits, temperature, vocab_size).gather(-1, ids)


def kl_divergence(p_logits, q_logits, temperature, vocab_size):
    log_p = _log_softmax(p_logits, temperature, vocab_size)
    log_q = _log_softmax(q_logits, temperature, vocab_size)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def jsd_from_log_probs(student_lp, teacher_lp, beta):
    """TRL's generalized_jsd_loss per token (β = 0: KL(T‖S), β = 1: KL(S‖T))."""
    if beta == 0:
        return F.kl_div(student_lp, teacher_lp, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(teacher_lp, student_lp, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=student_lp.dtype)
    mixture = torch.logsumexp(torch.stack([student_lp + torch.log(1 - b), teacher_lp + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(mixture, teacher_lp, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, student_lp, reduction="none", log_target=True)
    return (beta * kl_teacher + (1 - beta) * kl_student).sum(-1)


def generalized_jsd(student_logits, teacher_logits, beta, temperature, vocab_size):
    return jsd_from_log_probs(_log_softmax(student_logits, temperature, vocab_size),
                              _log_softmax(teacher_logits, temperature, vocab_size), beta)


def vocab_topk(logits, k, vocab_size):
    return torch.topk(logits[..., :vocab_size], k, dim=-1)


def _add_tail(log_probs):
    # SDPO's add_tail: log(1 − Σp) with the log-sum clamped at −1e-7
    log_s = torch.clamp(torch.logsumexp(log_probs, dim=-1, keepdim=True), max=-1e-7)
    return torch.cat([log_probs, torch.log(-torch.expm1(log_s))], dim=-1)


def topk_distillation_loss(student_logits, teacher_logits, k, temperature, vocab_size, support, divergence,
                           beta, tail_bucket):
    chooser = teacher_logits if support == "teacher" else student_logits
    ids = torch.topk(chooser.detach()[..., :vocab_size], k, dim=-1).indices
    student_lp = _log_softmax(student_logits, temperature, vocab_size).gather(-1, ids)
    teacher_lp = _log_softmax(teacher_logits, temperature, vocab_size).gather(-1, ids)
    if tail_bucket:
        student_lp, teacher_lp = _add_tail(student_lp), _add_tail(teacher_lp)
    else:
        student_lp = student_lp - student_lp.logsumexp(-1, keepdim=True)
        teacher_lp = teacher_lp - teacher_lp.logsumexp(-1, keepdim=True)
    if divergence == "kl":
        return F.kl_div(student_lp, teacher_lp, reduction="none", log_target=True).sum(-1)
    return jsd_from_log_probs(student_lp, teacher_lp, beta)
