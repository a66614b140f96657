"""Full-vocabulary top-k of vocab-parallel logits, and top-k distillation losses built on it.

Top-k: each rank takes its local top-k, the k·TP candidates (values and global ids) are
all-gathered, and every rank selects the same global top-k from them (spec §8).

Top-k distillation compares two distributions restricted to one support of k ids per token:
the teacher's top-k (OPSD's "top-k, renormalised" option, the default) or the student's
top-k (SDPO). Both models' log-probabilities at those ids come from `log_probs_at_ids` (exact,
full-vocabulary normalisers), then either
- renormalised over the k ids (``tail_bucket=False``), or
- extended with a tail bucket ``log(1 − Σ_k p)`` holding the remaining mass (``tail_bucket=True``,
  SDPO's choice), which keeps the full distribution's total mass and its gradient on the rest
  of the vocabulary,
and the divergence (KL(teacher‖student) or generalised JSD_β) is taken over those k (+1) entries.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from rlsd_megatron.ops.log_probs import log_probs_at_ids
from rlsd_megatron.ops.vocab_shard import compute_dtype, flat_tokens, permute_tokens, token_order, vocab_shard

__all__ = ["append_tail_bucket", "topk_distillation_loss", "vocab_topk"]

# SDPO floors the tail's log-sum at −1e-7 so log(1 − Σp) stays finite when the top-k holds all
# the mass (to float precision): the tail probability is then ~1e-7 rather than 0.
_TAIL_LOG_SUM_MAX = -1e-7


def vocab_topk(
    logits: torch.Tensor,
    k: int,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits over the full (unpadded) vocabulary, and their global ids.

    ``logits`` is this rank's ``[..., V_local]`` shard; returns ``(values [..., k], ids [..., k])``,
    sorted descending and identical on every rank, values in the logits' dtype (differentiable:
    the gradient reaches the rank that owns each id), ids int64. Ties are broken arbitrarily but
    consistently across ranks. Temperature does not change the order, so there is none.
    Communication: one all-gather of ``[tokens, k]`` values and ids.
    """
    shard = vocab_shard(logits, group, vocab_size)
    vocab = vocab_size if vocab_size is not None else shard.local_size * shard.world_size
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, vocab_size = {vocab}], got {k}")
    order = token_order(logits)
    logits = permute_tokens(logits, order)
    z = flat_tokens(logits)
    n, dtype = z.shape[0], compute_dtype(z.dtype)
    k_local = min(k, shard.valid)
    with torch.no_grad():
        values = torch.full((n, k), float("-inf"), dtype=dtype, device=z.device)
        ids = torch.full((n, k), -1, dtype=torch.int64, device=z.device)
        if k_local:
            local_values, local_columns = z[:, : shard.valid].topk(k_local, dim=-1)
            values[:, :k_local] = local_values
            ids[:, :k_local] = local_columns + shard.start
        # [world, n, k] → [n, world·k] candidates, then the global top-k among them
        candidates = shard.all_gather(values).permute(1, 0, 2).reshape(n, -1)
        candidate_ids = shard.all_gather(ids).permute(1, 0, 2).reshape(n, -1)
        top_values, picks = candidates.topk(k, dim=-1)
        top_ids = candidate_ids.gather(1, picks)
    if logits.requires_grad and torch.is_grad_enabled():
        top_values = _ValuesAtIds.apply(logits, top_ids, shard)
    else:
        top_values = top_values.to(logits.dtype)
    shape = (*logits.shape[:-1], k)
    return tuple(permute_tokens(t.reshape(shape), order, inverse=True) for t in (top_values, top_ids))


class _ValuesAtIds(torch.autograd.Function):
    """Logits at global ids (replicated): the owner contributes each value, one all-reduce sums;
    backward scatters the (replicated) gradient into the owner's shard, in place."""

    @staticmethod
    def forward(ctx, logits, ids, shard):
        z = flat_tokens(logits)
        column, owned = shard.owned(ids)
        values = torch.where(owned, z.gather(1, column).to(compute_dtype(z.dtype)), 0.0)
        ctx.save_for_backward(column, owned)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return shard.all_reduce_(values).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        column, owned = ctx.saved_tensors
        out = torch.zeros(column.shape[0], ctx.shape[-1], dtype=ctx.dtype, device=grad.device)
        out.scatter_add_(1, column, torch.where(owned, grad, 0).to(ctx.dtype))
        return out.view(ctx.shape), None, None


def append_tail_bucket(log_probs: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` log-probabilities → ``[..., k+1]`` with the tail ``log(1 − Σ exp(log_probs))``.

    Computed as ``log(−expm1(logsumexp))``, accurate when the top-k holds almost all the mass;
    the log-sum is capped at −1e-7 (SDPO's guard) so the tail stays finite.
    """
    log_sum = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=_TAIL_LOG_SUM_MAX)
    return torch.cat([log_probs, torch.log(-torch.expm1(log_sum))], dim=-1)


def _divergence(teacher_lp: torch.Tensor, student_lp: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """KL(T‖S) or generalised JSD_β over the last dim of two log-probability tensors (same
    convention as `generalized_jsd`)."""
    if divergence == "kl" or (divergence == "jsd" and beta == 0.0):
        return (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1)
    if beta == 1.0:
        return (student_lp.exp() * (student_lp - teacher_lp)).sum(-1)
    log_m = torch.logaddexp(teacher_lp + math.log(beta), student_lp + math.log(1 - beta))
    kl_t = (teacher_lp.exp() * (teacher_lp - log_m)).sum(-1)
    kl_s = (student_lp.exp() * (student_lp - log_m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    support: str = "teacher",
    divergence: str = "kl",
    beta: float = 0.5,
    tail_bucket: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token divergence between teacher and student restricted to k vocabulary ids.

    Defaults (OPSD's top-k option): ``KL(T̂‖Ŝ)`` where T̂ and Ŝ are teacher and student
    probabilities (``softmax(logits/τ)`` over the full vocabulary) at the *teacher's* top-k ids,
    each renormalised over those k ids. ``support="student"`` uses the student's top-k ids
    instead; ``tail_bucket=True`` keeps the probabilities unrenormalised and adds a (k+1)-th
    bucket with the remaining mass ``1 − Σ_k p`` (see `append_tail_bucket`);
    ``divergence="jsd"`` takes the generalised JSD_β of `generalized_jsd` (β = 0 → KL(T‖S),
    β = 1 → KL(S‖T)) over the same entries. SDPO is ``support="student", divergence="jsd",
    beta=0.5, tail_bucket=True, k=100``. The support is selected without gradient; both logits
    get exact gradients through the log-probabilities (detach the teacher for a stop-grad
    target). Shapes: ``[..., V_local]`` shards in, float32 ``[...]`` out, replicated on every rank.
    """
    if support not in ("teacher", "student"):
        raise ValueError(f"support must be 'teacher' or 'student', got {support!r}")
    if divergence not in ("kl", "jsd"):
        raise ValueError(f"divergence must be 'kl' or 'jsd', got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    support_logits = teacher_logits if support == "teacher" else student_logits
    _, ids = vocab_topk(support_logits.detach(), k, group=group, vocab_size=vocab_size)
    common = dict(temperature=temperature, group=group, vocab_size=vocab_size, chunk_size=chunk_size)
    student_lp = log_probs_at_ids(student_logits, ids, **common)
    teacher_lp = log_probs_at_ids(teacher_logits, ids, **common)
    if tail_bucket:
        student_lp, teacher_lp = append_tail_bucket(student_lp), append_tail_bucket(teacher_lp)
    else:
        student_lp = student_lp - torch.logsumexp(student_lp, dim=-1, keepdim=True)
        teacher_lp = teacher_lp - torch.logsumexp(teacher_lp, dim=-1, keepdim=True)
    return _divergence(teacher_lp, student_lp, divergence, beta)
