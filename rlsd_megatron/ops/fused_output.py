"""The output layer fused with the token log-prob / entropy op: per-token values straight from the
last hidden states, with no ``[tokens, V/TP]`` logits held for the micro-batch.

Today's path runs Megatron's output layer, which writes the logits of every token of the
micro-batch (``4·T·V/TP`` bytes in fp32: 8K tokens x 152K vocabulary = 5 GB per TP rank), then
`token_log_probs` on them; autograd keeps those logits, and the backward writes their gradient
as large again. Here tokens go ``chunk_tokens`` at a time:

    forward   z_c = h_c · W_shardᵀ;  log p, H, lse of the chunk (`log_probs_forward`);  drop z_c
    backward  z_c again (one matmul);  ∂z_c from lse and H (`log_probs_grad`: local, no
              collective);  ∂h_c = ∂z_c · W;  ∂W += ∂z_cᵀ · h_c  (one [V/TP, H] buffer)

so the extra memory is one chunk's logits, their gradient and the op's workspace, whatever the
sequence length. The price is the recomputed matmul; the softmax statistics are not recomputed
(``lse`` and ``H`` are kept per token). Values and gradients are `token_log_probs`' on the
output layer's logits, up to the order of float sums in ∂W.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlsd_megatron.ops.log_probs import log_probs_forward, log_probs_grad
from rlsd_megatron.ops.vocab_shard import check_temperature, compute_dtype, token_chunks, vocab_shard

# Tokens per chunk: 1024 tokens x 152K/TP columns are ~0.6 GB/TP of fp32 logits, about as much
# again for their gradient and the op's workspace: a few GB at most on a GPU.
DEFAULT_CHUNK_TOKENS = 512  # train.fused_output_chunk_tokens's default


def output_layer_input(hidden: torch.Tensor, *, sequence_parallel: bool = False) -> torch.Tensor:
    """What Megatron's column-parallel output layer multiplies: ``hidden`` gathered from the
    sequence-parallel region, or copied into the tensor-parallel region (identity forward,
    all-reduce of the gradient backward, so that ∂h sums every vocabulary shard's share).
    Identity when Megatron's groups are not initialised (a single process)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    if not parallel_state.model_parallel_is_initialized():
        return hidden
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden)
    return copy_to_tensor_model_parallel_region(hidden)


class _FusedTokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, shard, temperature, chunk_tokens, want_entropy):
        n = hidden.shape[0]
        log_p, entropy, lse = (torch.empty(n, dtype=compute_dtype(hidden.dtype), device=hidden.device) for _ in range(3))
        for rows in token_chunks(n, chunk_tokens):
            values = log_probs_forward(hidden[rows] @ weight.t(), target[rows], shard, temperature, None, want_entropy)
            for out, value in zip((log_p, entropy, lse), values):
                out[rows] = value
        ctx.save_for_backward(hidden, weight, target, lse, entropy)
        ctx.shard, ctx.temperature, ctx.chunk_tokens = shard, temperature, chunk_tokens
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        return log_p, entropy

    @staticmethod
    def backward(ctx, grad_log_p, grad_entropy):
        hidden, weight, target, lse, entropy = ctx.saved_tensors
        if grad_log_p is None and grad_entropy is None:
            return (None,) * 7
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for rows in token_chunks(hidden.shape[0], ctx.chunk_tokens):
            grad_logits = log_probs_grad(
                hidden[rows] @ weight.t(), target[rows], lse[rows], entropy[rows],
                None if grad_log_p is None else grad_log_p[rows], None if grad_entropy is None else grad_entropy[rows],
                ctx.shard, ctx.temperature, None).to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
            del grad_logits
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    return_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_log_probs` of the logits ``hidden · weightᵀ`` without materialising them.

    ``hidden``: ``[T, H]`` last hidden states (through `output_layer_input` under tensor
    parallelism), ``weight``: this rank's ``[V/TP, H]`` output-layer shard (the input embedding
    for tied embeddings), ``target_ids``: ``[T]`` global ids. Temperature, ``group``,
    ``vocab_size`` and the results (``[T]`` float32 log p, and the entropy) are as in
    `token_log_probs`; differentiable with respect to ``hidden`` and ``weight``."""
    temperature = check_temperature(temperature)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [T, H] and "
                         f"[V/TP, H] with the same H")
    if tuple(target_ids.shape) != (hidden.shape[0],):
        raise ValueError(f"target_ids of shape {tuple(target_ids.shape)} must be [T] = [{hidden.shape[0]}]")
    shard = vocab_shard(weight[:, :0].t(), group, vocab_size)  # a [0, V/TP] view: the shard's geometry
    log_p, entropy = _FusedTokenLogProbs.apply(hidden, weight, target_ids, shard, temperature, chunk_tokens,
                                               return_entropy)
    return (log_p, entropy) if return_entropy else log_p
