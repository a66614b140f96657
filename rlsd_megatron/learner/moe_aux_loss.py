"""The MoE load-balancing loss as transformers defines it, with our globally normalised losses.

transformers' Qwen3-MoE (and Qwen2-MoE, with the same function) adds `router_aux_loss_coef` x
`load_balancing_loss_func` to a forward's loss: with every layer's router softmax p_lte (layer l,
token t, expert e) over the T real (unpadded) tokens of the batch and L layers,

    aux = E · Σ_e f̄_e · P̄_e,   f̄_e = Σ_l count_le / (L·T),   P̄_e = Σ_l Σ_t p_lte / (L·T),

where count_le is how many of the tokens layer l sends to expert e (top-k, so Σ_e f̄_e = k) and
only P̄ carries a gradient: ∂aux/∂p_lte = E·f̄_e / (L·T). The counts pool every layer, so this
is not a sum of per-layer losses; megatron-core's own aux loss is one (with f summing to 1, and
pre-multiplied by the micro-batch's tokens for a finalize step our learner replaces), so it stays
off and this module injects the gradient itself:

- a forward hook on every router (training forwards) records its layer's counts over the
  micro-batch's real tokens
  (all-reduced over TP under sequence parallelism, which splits the tokens) and recomputes the
  softmax scores from the router's input and weight, then attaches `_InjectAuxGradient` to the
  router's output probabilities;
- in backward, after every layer's forward (so f̄ is complete), that function hands the scores
  the gradient coeff · w · E·f̄_e / (L·T) for each real token, which flows to the router weight
  and, through its input, to the layers below — as autograd would for aux itself.

w spreads the loss over a step: the step's gradient is coeff x the mean over its micro-batches
(M on each of the DP data-parallel ranks) of each micro-batch's aux gradient, w = 1/(M·DP), so
neither the token count, the number of micro-batches nor DP changes its scale (the gradient sums
over micro-batches and DP ranks, as our globally normalised losses expect).

Pooling over all layers needs them in one pipeline stage: `config_checks` refuses the loss with
PP > 1 or CP > 1 (not implemented: counts would cross stages / the CP split).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlsd_megatron.learner.batch import MicroBatch


class _MicroBatchRouting:
    """One micro-batch's routing statistics, filled layer by layer during its forward."""

    def __init__(self, mask: torch.Tensor, weight: float):
        self.mask = mask  # [N] float: 1 for this rank's real tokens, in the router's row order
        self.weight = weight
        self.tokens: torch.Tensor | None = None  # real tokens of the micro-batch (all TP ranks)
        self.counts: dict[int, torch.Tensor] = {}  # layer number → [E] routed real tokens
        self.prob_sums: dict[int, torch.Tensor] = {}  # layer number → [E] local Σ_t p_lte (detached)

    def pooled_fractions(self) -> torch.Tensor:
        """f̄ [E]: every layer's routed share of the real tokens, pooled (sums to top-k)."""
        return torch.stack(list(self.counts.values())).sum(0) / (len(self.counts) * self.tokens)

    def value(self, group) -> torch.Tensor:
        """transformers' aux (without the coefficient) of this micro-batch, as a 0-d tensor."""
        prob_sums = torch.stack(list(self.prob_sums.values())).sum(0)
        if group is not None:
            dist.all_reduce(prob_sums, group=group)
        pooled_probs = prob_sums / (len(self.prob_sums) * self.tokens)
        return len(pooled_probs) * (self.pooled_fractions() * pooled_probs).sum()


class _InjectAuxGradient(torch.autograd.Function):
    """Identity on the router's probabilities; in backward, the aux gradient for the scores."""

    @staticmethod
    def forward(ctx, probs, scores, routing: _MicroBatchRouting, coeff: float):
        ctx.routing, ctx.coeff = routing, coeff
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        routing = ctx.routing
        fractions = routing.pooled_fractions()  # [E]
        experts, layers = fractions.numel(), len(routing.counts)
        scale = ctx.coeff * routing.weight * experts / (layers * routing.tokens)
        grad_scores = scale * routing.mask[:, None] * fractions[None, :]
        return grad_probs, grad_scores.to(grad_probs.dtype if grad_probs is not None else torch.float32), None, None


def token_mask(mb: MicroBatch, rows: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """[rows] float mask of real tokens in the router's row order: megatron's hidden states are
    [S, B] sequence-major, and sequence parallelism gives TP rank r the r-th slice of S."""
    batch, seq = mb.tokens.shape
    real = torch.zeros(batch, seq)
    for i, length in enumerate(mb.lengths):
        row, start = (0, mb.offsets[i]) if mb.packed_seq_params is not None else (i, 0)
        real[row, start:start + length] = 1.0
    per_rank = seq // tp_size
    local = real.t()[tp_rank * per_rank:(tp_rank + 1) * per_rank].reshape(-1)
    if local.numel() != rows:
        raise RuntimeError(f"MoE aux loss: the router saw {rows} tokens, the micro-batch holds {local.numel()} on "
                           f"this rank ([B, S]={tuple(mb.tokens.shape)}, TP={tp_size})")
    return local


class LoadBalancingLoss:
    """Hooks transformers' load-balancing loss into every router of `chunks` (see the module
    docstring). `begin(mb, weight)` before each micro-batch's forward; `values()` the aux values
    of the micro-batches run since `reset()`."""

    def __init__(self, chunks: list[torch.nn.Module], coeff: float, sequence_parallel: bool):
        from megatron.core import parallel_state

        self.coeff = coeff
        self.sp_group = parallel_state.get_tensor_model_parallel_group() if sequence_parallel else None
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank() if sequence_parallel else 0
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1
        self.current: _MicroBatchRouting | None = None
        self.finished: list[_MicroBatchRouting] = []
        self.current_mb: MicroBatch | None = None
        self.current_weight = 0.0
        for chunk in chunks:
            module = getattr(chunk, "module", chunk)
            for layer in module.decoder.layers:
                layer.mlp.router.register_forward_hook(self._hook)

    def reset(self) -> None:
        self.finished = []

    def begin(self, mb: MicroBatch, weight: float) -> None:
        """The next forward is micro-batch `mb`, its aux weighted by `weight` (1/(M·DP))."""
        self.current_mb, self.current_weight, self.current = mb, weight, None

    def values(self) -> list[float]:
        return [float(routing.value(self.sp_group)) for routing in self.finished]

    def _hook(self, router, inputs, output):
        # Training forwards only (forward-only passes run in eval mode). Under full activation
        # recomputation the first forward runs without grad: it records the counts, and the
        # recomputation in backward attaches the gradient (f̄ is complete by then either way).
        if not (router.training and self.current_mb is not None):
            return None
        probs, routing_map = output
        hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
        if self.current is None:
            mask = token_mask(self.current_mb, hidden.shape[0], self.tp_rank, self.tp_size).to(hidden.device)
            self.current = _MicroBatchRouting(mask, self.current_weight)
            tokens = mask.sum()
            if self.sp_group is not None:
                dist.all_reduce(tokens, group=self.sp_group)
            self.current.tokens = tokens
            self.finished.append(self.current)
        routing = self.current
        scores = torch.softmax(torch.nn.functional.linear(hidden, router.weight).float(), dim=-1)  # [N, E]
        with torch.no_grad():
            counts = (routing_map.float() * routing.mask[:, None]).sum(0)
            if self.sp_group is not None:
                dist.all_reduce(counts, group=self.sp_group)
            # By layer number: a recomputed forward (activation checkpointing) overwrites, never adds.
            routing.counts[router.layer_number] = counts
            routing.prob_sums[router.layer_number] = (scores * routing.mask[:, None]).sum(0)
        if not torch.is_grad_enabled():
            return None
        return _InjectAuxGradient.apply(probs, scores, routing, self.coeff), routing_map
