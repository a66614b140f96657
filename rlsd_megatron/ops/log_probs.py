"""Log-probabilities (and entropy) of vocab-parallel logits at given token ids (spec §8).

With logits z split over the tensor-parallel group and s = z/τ:
    m = allreduce_max(max_k z),  S = allreduce_sum(Σ_k exp(s − m/τ)),  lse = m/τ + log S
    log p(y) = s_y − lse                       (s_y contributed by the rank owning y)
    H = lse − Σ p·s                            (computed as log S − Σ p·(s − m/τ), no cancellation)
The max and the sums are two all-reduces of [tokens]-sized tensors; nothing of vocabulary size
crosses ranks. The backward is local once lse is known:
    ∂ log p(y)/∂s_j = 1[j = y] − p_j,        ∂H/∂s_j = −p_j (log p_j + H),
recomputed chunk by chunk from the caller's logits (nothing [tokens, V] is saved).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlsd_megatron.ops.vocab_shard import (
    LN2,
    UnprojectedLogits,
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

__all__ = ["log_probs_at_ids", "token_log_probs"]


def _check_ids(ids: torch.Tensor, logits: torch.Tensor, name: str, trailing: int) -> None:
    want = tuple(logits.shape[:-1])
    got = tuple(ids.shape[: ids.dim() - trailing]) if trailing else tuple(ids.shape)
    if got != want or ids.dim() != len(want) + trailing:
        raise ValueError(f"{name} of shape {tuple(ids.shape)} does not match logits {tuple(logits.shape)}: "
                         f"expected {'[..., k]' if trailing else '[...]'} with leading dims {want}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor of vocabulary ids, got {ids.dtype}")


def log_probs_forward(z: torch.Tensor, target: torch.Tensor, shard: VocabShard, temperature: float, chunk_size,
                      want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(target), entropy (zeros unless ``want_entropy``) and the log-normaliser ``lse`` (in
    logit units), each ``[N]``, of flat ``[N, V_local]`` logits ``z`` and flat ``[N]`` targets."""
    n, dtype = z.shape[0], compute_dtype(z.dtype)
    rows = chunk_rows(chunk_size, shard.valid, z.device)
    work = Workspace(2 if want_entropy else 1, min(rows, n), shard.valid, dtype, z.device)
    column, owned = shard.owned(target.reshape(-1, 1).long())
    m_local = torch.full((n, 1), float("-inf"), dtype=dtype, device=z.device)
    sums = torch.zeros(n, 3, dtype=dtype, device=z.device)  # Σ2^b, b_y, Σ2^b·b (local max frame)
    for rows_ in token_chunks(n if shard.valid else 0, rows):
        zc = z[rows_, : shard.valid]
        bufs = work.views(zc.shape[0])
        local_max_(zc, m_local[rows_])
        bits = to_bits(zc, m_local[rows_], temperature, bufs[0])
        torch.gather(bits, 1, column[rows_], out=sums[rows_, 1:2])
        if want_entropy:
            weights = torch.exp2(bits, out=bufs[1])
            torch.sum(weights, dim=-1, keepdim=True, out=sums[rows_, 0:1])
            torch.sum(weights.mul_(bits), dim=-1, keepdim=True, out=sums[rows_, 2:3])
        else:
            torch.sum(bits.exp2_(), dim=-1, keepdim=True, out=sums[rows_, 0:1])
    m, delta = to_global_frame(shard, m_local, temperature)
    if shard.valid:
        scale = torch.exp2(delta)
        sums[:, 2:3] = scale * (sums[:, 2:3] + delta * sums[:, 0:1])
        sums[:, 0:1] *= scale
        sums[:, 1:2] = torch.where(owned, sums[:, 1:2] + delta, 0.0)
    shard.all_reduce_(sums)
    total, bits_y, weighted = sums.unbind(-1)
    log2_total = torch.log2(total)
    log_p = LN2 * (bits_y - log2_total)
    entropy = LN2 * (log2_total - weighted / total) if want_entropy else torch.zeros_like(log_p)
    lse = m.squeeze(-1) + (temperature * LN2) * log2_total
    return log_p, entropy, lse


def log_probs_grad(z: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                   grad_log_p: torch.Tensor | None, grad_entropy: torch.Tensor | None, shard: VocabShard,
                   temperature: float, chunk_size) -> torch.Tensor:
    """∂/∂z of ``Σ g_lp·log p(y) + g_h·H`` for flat ``[N, V_local]`` logits, from `log_probs_forward`'s
    ``lse`` and ``entropy``: local, chunk by chunk, no collective."""
    n, dtype = z.shape[0], compute_dtype(z.dtype)
    grad = new_grad(z, shard)
    rows = chunk_rows(chunk_size, shard.valid, z.device)
    direct = grad.dtype == dtype  # else compute in a buffer and cast on the copy
    work = Workspace(2 + (not direct), min(rows, n), shard.valid, dtype, z.device)
    column, owned = shard.owned(target.reshape(-1, 1).long())
    lse = lse.unsqueeze(-1)
    # ∂/∂z_j = (g_lp·(1[j=y] − p_j) − g_h·p_j·(ln p_j + H)) / τ
    #        = p_j·(a + c·log2 p_j) + 1[j=y]·g_lp/τ
    g_lp = torch.zeros_like(lse) if grad_log_p is None else grad_log_p.reshape(-1, 1).to(dtype) / temperature
    a, c = -g_lp, None
    if grad_entropy is not None:
        g_h = grad_entropy.reshape(-1, 1).to(dtype) / temperature
        a, c = a - g_h * entropy.unsqueeze(-1), -LN2 * g_h
    one_hot = torch.where(owned, g_lp, 0.0) if grad_log_p is not None else None
    for rows_ in token_chunks(n if shard.valid else 0, rows):
        zc = z[rows_, : shard.valid]
        bufs = work.views(zc.shape[0])
        out = grad[rows_, : shard.valid] if direct else bufs[2]
        bits = to_bits(zc, lse[rows_], temperature, bufs[0])  # log2 p
        if c is not None:
            p = torch.exp2(bits, out=bufs[1])
            torch.mul(p, bits.mul_(c[rows_]).add_(a[rows_]), out=out)
        else:
            torch.mul(bits.exp2_(), a[rows_], out=out)
        if one_hot is not None:
            out.scatter_add_(1, column[rows_], one_hot[rows_])
        if not direct:
            grad[rows_, : shard.valid].copy_(out)
    return grad


class _TokenLogProbs(torch.autograd.Function):
    """log p(y) and H per token; backward recomputes softmax chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, target, shard: VocabShard, temperature: float, chunk_size, want_entropy: bool):
        log_p, entropy, lse = log_probs_forward(flat_tokens(logits), target, shard, temperature, chunk_size,
                                                want_entropy)
        ctx.save_for_backward(logits, target, lse, entropy)
        ctx.shard, ctx.temperature, ctx.chunk_size = shard, temperature, chunk_size
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        shape = logits.shape[:-1]
        return log_p.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_log_p, grad_entropy):
        if grad_log_p is None and grad_entropy is None:
            return (None,) * 6
        logits, target, lse, entropy = ctx.saved_tensors
        grad = log_probs_grad(flat_tokens(logits), target, lse, entropy, grad_log_p, grad_entropy, ctx.shard,
                              ctx.temperature, ctx.chunk_size)
        return grad.view(logits.shape), None, None, None, None, None


def token_log_probs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``target_ids`` (and the entropy) under vocab-parallel ``logits``.

    ``logits`` is this rank's ``[..., V_local]`` shard (rank r of ``group`` owns global ids
    ``[r·V_local, (r+1)·V_local)``), ``target_ids`` the global ids ``[...]``. The distribution is
    ``softmax(logits / temperature)`` over ids ``< vocab_size`` (default: ``V_local·TP``, no
    padding). ``group=None`` means Megatron's tensor-parallel group when it is initialised, else a
    single shard. Returns float32 ``[...]`` log p(target) (float64 for float64 logits), replicated
    on every rank, and with ``return_entropy`` also the entropy ``[...]`` in nats. Both are
    differentiable with respect to ``logits``; the caller's tensor is never modified. Targets
    outside ``[0, vocab_size)`` are not checked (that would cost a host sync): their result is
    meaningless and must be masked out. Tokens are processed ``chunk_size`` at a time (default:
    about 4 MiB of fp32 per buffer on CPU, 128 MiB on GPU; see ``vocab_shard.CPU_CHUNK_BYTES``).
    ``logits`` may be `UnprojectedLogits` (`train.fused_output_layer`): then the logits are
    computed chunk by chunk and never held whole (`ops.fused_output.fused_token_log_probs`).
    """
    if isinstance(logits, UnprojectedLogits):  # train.fused_output_layer: never materialised
        from rlsd_megatron.ops.fused_output import fused_token_log_probs

        shape = logits.hidden.shape[:-1]
        values = fused_token_log_probs(flat_tokens(logits.hidden), logits.weight, target_ids.reshape(-1),
                                       temperature=temperature, group=group, vocab_size=vocab_size,
                                       return_entropy=return_entropy, chunk_tokens=logits.chunk_tokens)
        return tuple(v.view(shape) for v in values) if return_entropy else values.view(shape)
    temperature = check_temperature(temperature)
    _check_ids(target_ids, logits, "target_ids", trailing=0)
    shard = vocab_shard(logits, group, vocab_size)
    order = token_order(logits)
    log_p, entropy = _TokenLogProbs.apply(permute_tokens(logits, order), permute_tokens(target_ids, order),
                                          shard, temperature, chunk_size, return_entropy)
    log_p, entropy = (permute_tokens(t, order, inverse=True) for t in (log_p, entropy))
    return (log_p, entropy) if return_entropy else log_p


class _LogProbsAtIds(torch.autograd.Function):
    """log p at k global ids per token; backward is scatter(g) − p·Σg, chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, ids, shard: VocabShard, temperature: float, chunk_size):
        z = flat_tokens(logits)
        k = ids.shape[-1]
        n, dtype = z.shape[0], compute_dtype(z.dtype)
        rows = chunk_rows(chunk_size, shard.valid, z.device)
        work = Workspace(1, min(rows, n), shard.valid, dtype, z.device)
        column, owned = shard.owned(ids.reshape(-1, k).long())
        m_local = torch.full((n, 1), float("-inf"), dtype=dtype, device=z.device)
        sums = torch.zeros(n, 1 + k, dtype=dtype, device=z.device)  # [Σ2^b, b at the k ids]
        for rows_ in token_chunks(n if shard.valid else 0, rows):
            zc = z[rows_, : shard.valid]
            local_max_(zc, m_local[rows_])
            bits = to_bits(zc, m_local[rows_], temperature, work.views(zc.shape[0])[0])
            torch.gather(bits, 1, column[rows_], out=sums[rows_, 1:])
            torch.sum(bits.exp2_(), dim=-1, keepdim=True, out=sums[rows_, 0:1])
        m, delta = to_global_frame(shard, m_local, temperature)
        if shard.valid:
            sums[:, 0:1] *= torch.exp2(delta)
            sums[:, 1:] = torch.where(owned, sums[:, 1:] + delta, 0.0)
        shard.all_reduce_(sums)
        log2_total = torch.log2(sums[:, 0:1])
        log_p = LN2 * (sums[:, 1:] - log2_total)
        lse = m.squeeze(-1) + (temperature * LN2) * log2_total.squeeze(-1)
        ctx.save_for_backward(logits, ids, lse)
        ctx.shard, ctx.temperature, ctx.chunk_size = shard, temperature, chunk_size
        return log_p.view(ids.shape)

    @staticmethod
    def backward(ctx, grad_log_p):
        logits, ids, lse = ctx.saved_tensors
        shard, temperature = ctx.shard, ctx.temperature
        z = flat_tokens(logits)
        k = ids.shape[-1]
        n, dtype = z.shape[0], compute_dtype(z.dtype)
        grad = new_grad(z, shard)
        rows = chunk_rows(ctx.chunk_size, shard.valid, z.device)
        direct = grad.dtype == dtype
        work = Workspace(1 + (not direct), min(rows, n), shard.valid, dtype, z.device)
        g = grad_log_p.reshape(-1, k).to(dtype) / temperature
        column, owned = shard.owned(ids.reshape(-1, k).long())
        g_owned = torch.where(owned, g, 0.0)
        neg_total = -g.sum(-1, keepdim=True)
        lse = lse.unsqueeze(-1)
        for rows_ in token_chunks(n if shard.valid else 0, rows):
            zc = z[rows_, : shard.valid]
            bufs = work.views(zc.shape[0])
            out = grad[rows_, : shard.valid] if direct else bufs[1]
            p = to_bits(zc, lse[rows_], temperature, bufs[0]).exp2_()
            torch.mul(p, neg_total[rows_], out=out)
            out.scatter_add_(1, column[rows_], g_owned[rows_])
            if not direct:
                grad[rows_, : shard.valid].copy_(out)
        return grad.view(logits.shape), None, None, None, None


def log_probs_at_ids(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probabilities of vocab-parallel ``logits`` at ``k`` given global ids per token.

    ``ids`` is ``[..., k]`` (e.g. another model's `vocab_topk` ids, as SDPO scores the teacher
    at the student's top-k); returns float32 ``[..., k]`` log p(id), replicated on every rank
    and differentiable with respect to ``logits``. Each rank fills the ids it owns and one
    all-reduce of ``[tokens, k + 1]`` completes them. Temperature, padding (``vocab_size``),
    ``group`` and chunking are as in `token_log_probs`; ids must lie in ``[0, vocab_size)``
    (unchecked) and may repeat.
    """
    temperature = check_temperature(temperature)
    _check_ids(ids, logits, "ids", trailing=1)
    shard = vocab_shard(logits, group, vocab_size)
    order = token_order(logits)
    log_p = _LogProbsAtIds.apply(permute_tokens(logits, order), permute_tokens(ids, order), shard, temperature,
                                 chunk_size)
    return permute_tokens(log_p, order, inverse=True)
