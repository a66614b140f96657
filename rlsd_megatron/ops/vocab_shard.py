"""The plumbing every vocab-parallel op shares: which ids a rank owns, its collectives, token chunks.

Megatron's output layer leaves rank r of the tensor-parallel group with the logits of vocabulary
ids ``[r·V_local, (r+1)·V_local)``. Ids at or above the true ``vocab_size`` are padding (Megatron
pads the vocabulary to a multiple of 128·TP) and behave as −inf; since they sit at the end of the
vocabulary they are a suffix of the last ranks' shards, so each rank simply works on its first
``valid`` columns and never builds a masked copy.

Ops process tokens in chunks of ``chunk_size`` rows, reusing 1–5 preallocated ``[chunk, valid]``
buffers in float32 (float64 for float64 inputs; bf16/fp16 chunks are upcast into them, never the
whole tensor), so the extra memory of an op is its gradients plus this workspace, independent of
the sequence length. Exponentials are taken base 2 on "bit" values ``b = (z − shift)·log2(e)/τ``:
``exp2`` is about twice as fast as ``exp`` on CPU (Sleef) and is the native GPU instruction; the
conversion costs one in-cache multiply after the upcasting subtraction.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from rlsd_megatron.memory import CpuBufferCache

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)

# Default chunk: as many tokens as make one fp32 [chunk, V_local] buffer this big (an op holds
# 1 to 5 of them: log-prob 1, +entropy 2–3, KL 3, JSD 5). On CPU a few MiB keeps a chunk's
# passes in cache (measured: 10+ MiB chunks are slower); on GPU bigger chunks amortise launches.
CPU_CHUNK_BYTES = 4 << 20
GPU_CHUNK_BYTES = 128 << 20


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary and the group that holds the other slices.

    ``group`` is None when there is nothing to communicate with (TP = 1).
    """

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    start: int  # first global id owned here
    local_size: int  # V_local, the logits' last dimension
    valid: int  # owned ids below vocab_size: columns [0, valid) are real, the rest padding

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce over the group (``op`` is "sum" or "max"); a no-op at TP = 1."""
        if self.group is not None and tensor.numel() > 0:
            reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
            dist.all_reduce(tensor, op=reduce_op, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[world_size, *tensor.shape]``: every rank's tensor, in rank order."""
        if self.group is None:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)

    def owned(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local column, owned mask) for global ``ids``; unowned ids point at column 0."""
        local = ids - self.start
        mask = (local >= 0) & (local < self.valid)
        return torch.where(mask, local, torch.zeros_like(local)), mask


def resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``group``, or Megatron's tensor-parallel group when it is initialised, else None.

    megatron-core is only consulted if something already imported its parallel state: it cannot
    be initialised otherwise, and importing it costs seconds.
    """
    if group is not None:
        return group
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


@dataclass(frozen=True)
class UnprojectedLogits:
    """A micro-batch's logits not yet computed (`train.fused_output_layer`): the last hidden states
    ``[B, S, H]`` (through the output layer's input region) and this rank's ``[V/TP, H]`` output
    weight. `token_log_probs` takes it in place of logits and computes chunk by chunk
    (ops/fused_output.py); the ops that need whole distributions refuse it."""

    hidden: torch.Tensor
    weight: torch.Tensor
    chunk_tokens: int

    @property
    def device(self) -> torch.device:
        return self.hidden.device


def vocab_shard(logits: torch.Tensor, group: dist.ProcessGroup | None, vocab_size: int | None) -> VocabShard:
    """Shard geometry for vocab-parallel ``logits`` [..., V_local] over ``group`` (see `resolve_group`)."""
    if isinstance(logits, UnprojectedLogits):
        raise TypeError("this op needs the logits of whole distributions, which train.fused_output_layer=true never "
                        "computes (only token log-probs and entropy); set train.fused_output_layer=false")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension: shape [..., V_local]")
    group = resolve_group(group)
    rank, world_size = 0, 1
    if group is not None:
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if world_size == 1:
            group = None
    local_size = logits.shape[-1]
    padded = local_size * world_size
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(
            f"vocab_size={vocab_size} must be in (0, V_local·TP = {local_size}·{world_size} = {padded}]; "
            "pass the tokenizer's true vocabulary size (ids at or above it are padding)"
        )
    start = rank * local_size
    valid = min(max(vocab_size - start, 0), local_size)
    return VocabShard(group, rank, world_size, start, local_size, valid)


def flat_tokens(tensor: torch.Tensor, trailing: int = 1) -> torch.Tensor:
    """View ``tensor`` as [N, *last `trailing` dims] (a copy only if the layout forbids a view)."""
    return tensor.reshape(-1, *tensor.shape[tensor.dim() - trailing:])


def token_order(logits: torch.Tensor) -> list[int] | None:
    """A permutation of the leading (token) dims under which they flatten to a view, or None.

    The ops are per token, so the order of tokens is free: a [B, S, V] transpose of Megatron's
    [S, B, V] logits is processed in storage order rather than copied by a reshape.
    """
    lead = logits.dim() - 1
    order = sorted(range(lead), key=logits.stride, reverse=True)
    return None if order == list(range(lead)) else order


def permute_tokens(tensor: torch.Tensor, order: list[int] | None, inverse: bool = False) -> torch.Tensor:
    """Apply `token_order`'s permutation (or undo it) to the leading dims of ``tensor``."""
    if order is None:
        return tensor
    if inverse:
        order = sorted(range(len(order)), key=order.__getitem__)
    return tensor.permute(*order, *range(len(order), tensor.dim()))


# On CPU the gradients ops return reuse the storage of earlier ones autograd has dropped: a fresh
# logits-sized allocation spends more time in page faults than the op in arithmetic (fp32, TP=2,
# 1024 x 151,936: 226 of 771 ms; benchmarks/vocab_parallel_ops.py). Holds two gradients' memory.
_CPU_GRADIENTS = CpuBufferCache(slots=2)


def release_cached_gradients() -> None:
    """Let go of the CPU gradient storage kept for reuse (for measurements that start clean)."""
    _CPU_GRADIENTS.clear()


def new_grad(logits_flat: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """An uninitialised gradient for [N, V_local] logits whose padded columns are already 0."""
    if logits_flat.device.type == "cpu":
        grad = _CPU_GRADIENTS.take(logits_flat.numel(), logits_flat.dtype).view(logits_flat.shape)
    else:
        grad = torch.empty_like(logits_flat, memory_format=torch.contiguous_format)
    grad[:, shard.valid:].zero_()  # padded ids behave as −inf: no gradient
    return grad


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Chunks are computed in float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(chunk_size: int | None, width: int, device: torch.device) -> int:
    """Tokens per chunk: ``chunk_size``, or the device default (see `CPU_CHUNK_BYTES`)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        return chunk_size
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(1, budget // (4 * max(width, 1)))


def token_chunks(num_tokens: int, rows: int) -> Iterator[slice]:
    for begin in range(0, num_tokens, rows):
        yield slice(begin, min(begin + rows, num_tokens))


class Workspace:
    """``count`` reusable [rows, width] buffers; ``views(n)`` gives their first n rows."""

    def __init__(self, count: int, rows: int, width: int, dtype: torch.dtype, device: torch.device):
        self.buffers = [torch.empty(rows, width, dtype=dtype, device=device) for _ in range(count)]

    def views(self, n: int) -> list[torch.Tensor]:
        return [buffer[:n] for buffer in self.buffers]


def to_bits(z: torch.Tensor, shift: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """``out = (z − shift)·log2(e)/τ`` in ``out``'s dtype (upcasting ``z`` on the way); shift is [n, 1].

    The subtraction comes first so that it is exact near the max (Sterbenz), as in
    ``torch.log_softmax``; folding the shift into one fused multiply-add would cost accuracy of
    order ulp(max logit) on the most likely tokens.
    """
    torch.sub(z, shift, out=out)
    return out.mul_(LOG2E / temperature)


def local_max_(z: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:, 0]`` = row max of a chunk (written in place; ``out`` is [n, 1] of the compute dtype)."""
    if z.dtype == out.dtype:
        torch.amax(z, dim=-1, keepdim=True, out=out)
    else:
        out.copy_(z.amax(dim=-1, keepdim=True))


def to_global_frame(shard: VocabShard, m_local: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All-reduce the per-rank row maxima; return (global max, δ = (m_local − m)·log2(e)/τ ≤ 0).

    Partial sums taken in this rank's own max frame move to the global one with
    ``Σ 2^b' = 2^δ·Σ 2^b`` and ``b' = b + δ`` (one [tokens]-sized max all-reduce, no second pass).
    A rank with no real columns has m_local = −inf and contributes nothing.
    """
    m_global = shard.all_reduce_(m_local.clone(), op="max")
    return m_global, (m_local - m_global) * (LOG2E / temperature)


def check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)
