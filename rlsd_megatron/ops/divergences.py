"""Full-vocabulary KL and generalised Jensen–Shannon divergence between two vocab-parallel logit tensors.

Both operands are sharded the same way ([..., V_local] per tensor-parallel rank). Per token:

    KL(p‖q) = Σ p (log p − log q)
            = Σ_k e_p (s_p − s_q) / S_p − log S_p + log S_q      (e_p = exp(s_p − max), S_p = Σ e_p)
so one max all-reduce and one all-reduce of three [tokens] partial sums give it exactly.
JSD needs the mixture's log-probabilities, hence the normalisers first: max, sums, then one more
[2, tokens] all-reduce of the partial KL(T‖M) and KL(S‖M).

Gradients (s = z/τ), local once the per-token normalisers and divergences are known:
    ∂KL/∂s_p,j = p_j (log p_j − log q_j − KL),      ∂KL/∂s_q,j = q_j − p_j
    ∂JSD/∂s_S,j = (1−β) S_j (log S_j − log M_j − KL(S‖M))
    ∂JSD/∂s_T,j = β T_j (log T_j − log M_j − KL(T‖M))
and the backward recomputes each chunk from the callers' logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlsd_megatron.ops.vocab_shard import (
    LN2,
    VocabShard,
    Workspace,
    check_temperature,
    chunk_rows,
    compute_dtype,
    flat_tokens,
    local_max_,
    new_grad,
    permute_tokens,
    to_bits,
    to_global_frame,
    token_order,
    token_chunks,
    vocab_shard,
)

__all__ = ["generalized_jsd", "kl_divergence"]


def _pair_shard(a: torch.Tensor, b: torch.Tensor, group, vocab_size, names: str) -> VocabShard:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return vocab_shard(a, group, vocab_size)


def _normalisers(shard, logits, temperature, rows, work, dtype):
    """[N, len(logits)] global log-normalisers (logit units) of [N, V_local] tensors: max + sum."""
    n, count = logits[0].shape[0], len(logits)
    m_local = torch.full((n, count), float("-inf"), dtype=dtype, device=logits[0].device)
    totals = torch.zeros(n, count, dtype=dtype, device=logits[0].device)
    for rows_ in token_chunks(n if shard.valid else 0, rows):
        for i, z in enumerate(logits):
            zc = z[rows_, : shard.valid]
            local_max_(zc, m_local[rows_, i:i + 1])
            bits = to_bits(zc, m_local[rows_, i:i + 1], temperature, work.views(zc.shape[0])[0])
            torch.sum(bits.exp2_(), dim=-1, keepdim=True, out=totals[rows_, i:i + 1])
    m, delta = to_global_frame(shard, m_local, temperature)
    if shard.valid:
        totals *= torch.exp2(delta)
    shard.all_reduce_(totals)
    return m + (temperature * LN2) * torch.log2(totals)


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p_logits, q_logits, shard: VocabShard, temperature: float, chunk_size):
        zp, zq = flat_tokens(p_logits), flat_tokens(q_logits)
        n, dtype = zp.shape[0], compute_dtype(zp.dtype)
        rows = chunk_rows(chunk_size, shard.valid, zp.device)
        work = Workspace(3, min(rows, n), shard.valid, dtype, zp.device)
        m_local = torch.full((n, 2), float("-inf"), dtype=dtype, device=zp.device)
        sums = torch.zeros(n, 3, dtype=dtype, device=zp.device)  # Σ2^bp, Σ2^bq, Σ2^bp·(bp − bq)
        for rows_ in token_chunks(n if shard.valid else 0, rows):
            zpc, zqc = zp[rows_, : shard.valid], zq[rows_, : shard.valid]
            bp_buf, bq_buf, ep_buf = work.views(zpc.shape[0])
            local_max_(zpc, m_local[rows_, 0:1])
            local_max_(zqc, m_local[rows_, 1:2])
            bp = to_bits(zpc, m_local[rows_, 0:1], temperature, bp_buf)
            bq = to_bits(zqc, m_local[rows_, 1:2], temperature, bq_buf)
            ep = torch.exp2(bp, out=ep_buf)
            torch.sum(ep, dim=-1, keepdim=True, out=sums[rows_, 0:1])
            torch.sum(torch.sub(bp, bq, out=bp).mul_(ep), dim=-1, keepdim=True, out=sums[rows_, 2:3])
            torch.sum(bq.exp2_(), dim=-1, keepdim=True, out=sums[rows_, 1:2])
        m, delta = to_global_frame(shard, m_local, temperature)
        if shard.valid:
            scale = torch.exp2(delta)
            sums[:, 2:3] = scale[:, 0:1] * (sums[:, 2:3] + (delta[:, 0:1] - delta[:, 1:2]) * sums[:, 0:1])
            sums[:, :2] *= scale
        shard.all_reduce_(sums)
        log2_totals = torch.log2(sums[:, :2])
        kl = LN2 * (sums[:, 2] / sums[:, 0] - log2_totals[:, 0] + log2_totals[:, 1])
        lse = m + (temperature * LN2) * log2_totals  # [N, 2]: p, q
        ctx.save_for_backward(p_logits, q_logits, lse, kl)
        ctx.shard, ctx.temperature, ctx.chunk_size = shard, temperature, chunk_size
        return kl.view(p_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        p_logits, q_logits, lse, kl = ctx.saved_tensors
        shard, temperature = ctx.shard, ctx.temperature
        need_p, need_q = ctx.needs_input_grad[:2]
        zp, zq = flat_tokens(p_logits), flat_tokens(q_logits)
        n, dtype = zp.shape[0], compute_dtype(zp.dtype)
        rows = chunk_rows(ctx.chunk_size, shard.valid, zp.device)
        work = Workspace(3, min(rows, n), shard.valid, dtype, zp.device)
        g = grad_kl.reshape(-1, 1).to(dtype) / temperature
        g_ln2, g_kl = LN2 * g, g * kl.unsqueeze(-1)
        grad_p = new_grad(zp, shard) if need_p else None
        grad_q = new_grad(zq, shard) if need_q else None
        for rows_ in token_chunks(n if shard.valid else 0, rows):
            zpc, zqc = zp[rows_, : shard.valid], zq[rows_, : shard.valid]
            bp_buf, bq_buf, p_buf = work.views(zpc.shape[0])
            log2_p = to_bits(zpc, lse[rows_, 0:1], temperature, bp_buf)
            log2_q = to_bits(zqc, lse[rows_, 1:2], temperature, bq_buf)
            p = torch.exp2(log2_p, out=p_buf)
            if need_p:  # p·(ln p − ln q − KL)·g
                coef = log2_p.sub_(log2_q).mul_(g_ln2[rows_]).sub_(g_kl[rows_])
                _store(grad_p, rows_, shard, coef.mul_(p))
            if need_q:  # (q − p)·g
                _store(grad_q, rows_, shard, log2_q.exp2_().sub_(p).mul_(g[rows_]))
        return (None if grad_p is None else grad_p.view(p_logits.shape),
                None if grad_q is None else grad_q.view(q_logits.shape), None, None, None)


def _store(grad: torch.Tensor, rows_: slice, shard: VocabShard, chunk_grad: torch.Tensor) -> None:
    grad[rows_, : shard.valid].copy_(chunk_grad)


def kl_divergence(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Full-vocabulary ``KL(p‖q)`` per token between two vocab-parallel logit tensors.

    ``p = softmax(p_logits/τ)``, ``q = softmax(q_logits/τ)`` over ids ``< vocab_size``; both are
    this rank's ``[..., V_local]`` shards. Returns float32 ``[...]`` in nats, replicated on every
    rank, differentiable with respect to each argument that requires grad (detach the one that
    is a stop-gradient target). ``group``, padding and chunking are as in `token_log_probs`.
    """
    temperature = check_temperature(temperature)
    shard = _pair_shard(p_logits, q_logits, group, vocab_size, "p_logits and q_logits")
    order = token_order(p_logits)
    p_logits, q_logits = permute_tokens(p_logits, order), permute_tokens(q_logits, order)
    kl = _KL.apply(p_logits, q_logits, shard, temperature, chunk_size)
    return permute_tokens(kl, order, inverse=True)


class _JSD(torch.autograd.Function):
    """Generalised JSD for 0 < β < 1 (the end points are KLs, see `generalized_jsd`)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, shard: VocabShard, beta: float, temperature: float,
                chunk_size):
        zs, zt = flat_tokens(student_logits), flat_tokens(teacher_logits)
        n, dtype = zs.shape[0], compute_dtype(zs.dtype)
        rows = chunk_rows(chunk_size, shard.valid, zs.device)
        work = Workspace(5, min(rows, n), shard.valid, dtype, zs.device)
        lse = _normalisers(shard, (zs, zt), temperature, rows, work, dtype)
        partial = torch.zeros(n, 2, dtype=dtype, device=zs.device)  # Σ S·log2(S/M), Σ T·log2(T/M)
        for rows_ in token_chunks(n if shard.valid else 0, rows):
            *dists, log2_m = _mixture_chunk(zs, zt, rows_, lse, shard, beta, temperature, work)
            for i, (log2_x, prob) in enumerate(dists):
                torch.sum(log2_x.sub_(log2_m).mul_(prob), dim=-1, keepdim=True, out=partial[rows_, i:i + 1])
        shard.all_reduce_(partial)
        kl_to_mix = LN2 * partial  # [N, 2]: KL(S‖M), KL(T‖M)
        ctx.save_for_backward(student_logits, teacher_logits, lse, kl_to_mix)
        ctx.shard, ctx.beta, ctx.temperature, ctx.chunk_size = shard, beta, temperature, chunk_size
        return ((1 - beta) * kl_to_mix[:, 0] + beta * kl_to_mix[:, 1]).view(student_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_jsd):
        student_logits, teacher_logits, lse, kl_to_mix = ctx.saved_tensors
        shard, beta, temperature = ctx.shard, ctx.beta, ctx.temperature
        zs, zt = flat_tokens(student_logits), flat_tokens(teacher_logits)
        n, dtype = zs.shape[0], compute_dtype(zs.dtype)
        rows = chunk_rows(ctx.chunk_size, shard.valid, zs.device)
        work = Workspace(5, min(rows, n), shard.valid, dtype, zs.device)
        g = grad_jsd.reshape(-1, 1).to(dtype) / temperature
        # per argument: w·x_j·(ln x_j − ln M_j − KL(X‖M))·g = x_j·(log2(x_j/M_j)·c1 − c2)
        weighted = g * torch.tensor([1 - beta, beta], dtype=dtype, device=g.device)  # [N, 2]
        c1, c2 = LN2 * weighted, weighted * kl_to_mix
        grads = [new_grad(z, shard) if need else None for z, need in zip((zs, zt), ctx.needs_input_grad[:2])]
        for rows_ in token_chunks(n if shard.valid else 0, rows):
            *dists, log2_m = _mixture_chunk(zs, zt, rows_, lse, shard, beta, temperature, work)
            for i, (log2_x, prob) in enumerate(dists):
                if grads[i] is not None:
                    coef = log2_x.sub_(log2_m).mul_(c1[rows_, i:i + 1]).sub_(c2[rows_, i:i + 1])
                    _store(grads[i], rows_, shard, coef.mul_(prob))
        return tuple(None if gr is None else gr.view(student_logits.shape) for gr in grads) + (None,) * 4


def _mixture_chunk(zs, zt, rows_, lse, shard, beta, temperature, work):
    """One chunk's (log2 S, S), (log2 T, T) and log2 M with M = β·T + (1−β)·S, in five buffers.

    The mixture is formed in linear space (two exp2 we need anyway, one log2) rather than with
    logaddexp2, which is ~3× slower; it is floored at the smallest normal float so that ids
    where both S and T underflow give 0·finite = 0 instead of 0·(−inf).
    """
    zsc, ztc = zs[rows_, : shard.valid], zt[rows_, : shard.valid]
    s_log, t_log, s_buf, t_buf, m_buf = work.views(zsc.shape[0])
    log2_s = to_bits(zsc, lse[rows_, 0:1], temperature, s_log)
    log2_t = to_bits(ztc, lse[rows_, 1:2], temperature, t_log)
    s, t = torch.exp2(log2_s, out=s_buf), torch.exp2(log2_t, out=t_buf)
    mix = torch.add(torch.mul(s, 1 - beta, out=m_buf), t, alpha=beta, out=m_buf)
    log2_m = torch.log2(mix.clamp_min_(torch.finfo(mix.dtype).tiny), out=m_buf)
    return (log2_s, s), (log2_t, t), log2_m


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Generalised Jensen–Shannon divergence JSD_β(T, S) per token over the full vocabulary.

    Convention (spec §6, as TRL's GKD and the OPSD/SDPO code): with S = softmax(student/τ),
    T = softmax(teacher/τ) and the mixture ``M = β·T + (1−β)·S``,
    ``JSD_β = β·KL(T‖M) + (1−β)·KL(S‖M)``; the end points are defined as ``β = 0 → KL(T‖S)``
    (forward KL, teacher-weighted) and ``β = 1 → KL(S‖T)`` (reverse KL), not as the formula's
    limits (which are 0). β = 0.5 is the symmetric JSD. Inputs are this rank's ``[..., V_local]``
    shards; returns float32 ``[...]`` in nats, replicated on every rank, differentiable with
    respect to each argument that requires grad. ``group``, padding and chunking are as in
    `token_log_probs`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl_divergence(teacher_logits, student_logits, temperature=temperature, group=group,
                             vocab_size=vocab_size, chunk_size=chunk_size)
    if beta == 1.0:
        return kl_divergence(student_logits, teacher_logits, temperature=temperature, group=group,
                             vocab_size=vocab_size, chunk_size=chunk_size)
    temperature = check_temperature(temperature)
    shard = _pair_shard(student_logits, teacher_logits, group, vocab_size, "student_logits and teacher_logits")
    order = token_order(student_logits)
    jsd = _JSD.apply(permute_tokens(student_logits, order), permute_tokens(teacher_logits, order), shard,
                     float(beta), temperature, chunk_size)
    return permute_tokens(jsd, order, inverse=True)
