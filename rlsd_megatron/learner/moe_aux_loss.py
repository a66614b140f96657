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
  micro-batch's real tokens (all-reduced over the ranks that split those tokens: TP under sequence
  parallelism, CP) and recomputes the softmax scores from the router's input and weight, then
  attaches `_InjectAuxGradient` to the router's output probabilities;
- in backward, once every layer's counts are known, that function hands the scores the gradient
  coeff · w · E·f̄_e / (L·T) for each real token, which flows to the router weight and, through
  its input, to the layers below, as autograd would for aux itself. T is the micro-batch's real
  tokens (its sequences' lengths, which every rank of the model replica knows).

w spreads the loss over a step: the step's gradient is coeff x the mean over its micro-batches
(M on each of the DP data-parallel ranks) of each micro-batch's aux gradient, w = 1/(M·DP), so
neither the token count, the number of micro-batches nor DP changes its scale (the gradient sums
over micro-batches and DP ranks, as our globally normalised losses expect).

Pipeline parallelism: a stage routes only its own layers, and the schedule carries one activation
tensor between stages. But under megatron's 1F1B schedule the backward of micro-batch m starts, on
any stage, only after every stage has run m's forward (the gradient comes back from the last
stage, which ran m's forward after all the others). So after each training forward, before
sending its activation on, the stage posts an asynchronous all-reduce of its layers' counts [E],
its layer count, T, w and a serial number over a pipeline group of our own
(`parallel.state.new_pipeline_side_group`, so that it never queues with the activations: NCCL
runs a communicator's operations in order), and
`_InjectAuxGradient` waits for m's all-reduce at its first backward. Every stage runs its training
forwards in micro-batch order, so the k-th all-reduce of each stage is micro-batch k's: no pairing
to do, and by the time any stage waits for m's, every stage has posted it and all earlier ones:
nothing can deadlock. T, w and the serial travel along so that `end` checks, once per schedule,
that the stages' exchanges lined up (and agreed on T and w); it also waits for every exchange
before the schedule returns, so none is in flight after a step (a schedule that raises drops its
own: megatron's activations are then out of step too, and the next exchange's check fails rather
than pair stale counts).
Forward-only passes (scoring) record and send nothing. The interleaved schedule (virtual stages)
walks one table of (chunk, micro-batch) on every rank, so each chunk's forward posts its own
exchange and a micro-batch's backward waits for all of its chunks' (exact at PP=4 x VPP=2 with
recomputation: tests/learner/test_moe_aux_loss.py::test_interleaved_pipeline).

Full activation recomputation: a recomputed layer's first forward runs without gradients (it
records the counts), and its recomputation runs in backward after later micro-batches' forwards
(1F1B); each router keeps the micro-batches of its grad-free forwards in a first-in-first-out list
(a stage's backwards run in forward order) and the recomputation attaches the gradient for the
first of them. This needs megatron's reentrant checkpoint (a recomputed router is either always
checkpointed or never), which both megatron's and Transformer Engine's recomputation are.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from rlsd_megatron.learner.batch import MicroBatch


# What an exchange carries after the [E] counts: the layers they cover, then what every stage must
# agree on (T, the weight w, the serial number of the exchange).
_TAIL = 4


class _Exchange:
    """One chunk's forward of a micro-batch: [counts (E), layers, T, w, serial] of this rank, summed
    over the pipeline stages in place by `work` (None without pipeline parallelism)."""

    def __init__(self, values: torch.Tensor, work, serial: int):
        self.values, self.work, self.serial = values, work, serial


class _MicroBatchRouting:
    """One micro-batch's routing statistics on this rank, filled by its forward(s)."""

    def __init__(self, mask: torch.Tensor, tokens: float, weight: float, forwards: int):
        self.mask = mask  # [N] float: 1 for this rank's real tokens, in the router's row order
        self.tokens = tokens  # T: real tokens of the micro-batch (every TP / CP rank's)
        self.weight = weight
        self.forwards = forwards  # this rank's forwards of it: one per model chunk
        self.prob_sums: dict[int, torch.Tensor] = {}  # layer number → [E] local Σ_t p_lte (detached)
        self.exchanges: list[_Exchange] = []
        self._totals: torch.Tensor | None = None

    def totals(self) -> torch.Tensor:
        """[E + 4] float64: the routed counts summed over every layer of every stage, L, and the
        ranks' sums of T, w and the serials (waits for the exchanges the first time)."""
        if self._totals is None:
            if len(self.exchanges) != self.forwards:
                raise RuntimeError(f"MoE aux loss: a backward needs all {self.forwards} forwards of its micro-batch "
                                   f"on this rank, {len(self.exchanges)} ran (a pipeline schedule out of order?)")
            for exchange in self.exchanges:
                if exchange.work is not None:
                    exchange.work.wait()
            self._totals = torch.stack([exchange.values for exchange in self.exchanges]).sum(0)
        return self._totals

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(f̄ [E], which sums to top-k; L), float32 tensors."""
        totals = self.totals()
        experts = len(totals) - _TAIL
        layers = totals[experts]
        return (totals[:experts] / (layers * self.tokens)).float(), layers.float()


class _InjectAuxGradient(torch.autograd.Function):
    """Identity on the router's probabilities; in backward, the aux gradient for the scores."""

    @staticmethod
    def forward(ctx, probs, scores, routing: _MicroBatchRouting, coeff: float):
        ctx.routing, ctx.coeff = routing, coeff
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        routing = ctx.routing
        fractions, layers = routing.pooled()
        scale = ctx.coeff * routing.weight * fractions.numel() / (layers * routing.tokens)
        grad_scores = scale * routing.mask[:, None] * fractions[None, :]
        return grad_probs, grad_scores, None, None


def token_mask(mb: MicroBatch, tp_rank: int, tp_size: int) -> torch.Tensor:
    """[rows] float mask of real tokens in the router's row order: megatron's hidden states are
    [S, B] sequence-major; under context parallelism the rank holds the positions `mb.cp_index`
    of the full sequences, and sequence parallelism gives TP rank r the r-th slice of those."""
    batch, seq = mb.tokens.shape
    width = seq
    if mb.cp_index is not None:
        ends = [(mb.offsets[i] if mb.packed_seq_params is not None else 0) + n for i, n in enumerate(mb.lengths)]
        width = max(int(mb.cp_index.max()) + 1, *ends)
    real = torch.zeros(batch, width)
    for i, length in enumerate(mb.lengths):
        row, start = (0, mb.offsets[i]) if mb.packed_seq_params is not None else (i, 0)
        real[row, start:start + length] = 1.0
    if mb.cp_index is not None:
        real = real[:, mb.cp_index]
    per_rank = seq // tp_size
    return real.t()[tp_rank * per_rank:(tp_rank + 1) * per_rank].reshape(-1)


class LoadBalancingLoss:
    """Hooks transformers' load-balancing loss into every router of `chunks` (see the module
    docstring). Per training forward (of one model chunk): `begin(mb, weight)` before it,
    `end_forward()` after it; `end(completed)` after each schedule; `values()` the aux values of
    the micro-batches run since `reset()`."""

    def __init__(self, chunks: list[torch.nn.Module], coeff: float, sequence_parallel: bool):
        from megatron.core import parallel_state

        from rlsd_megatron.parallel.state import new_pipeline_side_group

        self.coeff = coeff
        tp = parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1
        cp = parallel_state.get_context_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank() if tp > 1 else 0
        self.tp_size = tp
        # The ranks that split a micro-batch's tokens and run its forward together.
        self.token_group = (parallel_state.get_tensor_and_context_parallel_group() if tp > 1 and cp > 1 else
                            parallel_state.get_tensor_model_parallel_group() if tp > 1 else
                            parallel_state.get_context_parallel_group() if cp > 1 else None)
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.pp_group = new_pipeline_side_group() if self.pp_size > 1 else None
        modules = [getattr(chunk, "module", chunk) for chunk in chunks]
        self.num_experts = modules[0].config.num_moe_experts
        self.num_chunks = len(modules)
        self.device = next(modules[0].parameters()).device
        self.finished: list[_MicroBatchRouting] = []  # since reset(), in forward order
        self.current: _MicroBatchRouting | None = None  # the training forward running now
        self._forward_counts: dict[int, torch.Tensor] = {}  # its layers' counts so far
        self._by_micro_batch: dict[int, _MicroBatchRouting] = {}  # this schedule's, by id(micro-batch)
        self._recompute: dict[torch.nn.Module, list[_MicroBatchRouting]] = defaultdict(list)
        self._serial = 0  # exchanges this rank has posted
        for module in modules:
            for layer in module.decoder.layers:
                layer.mlp.router.register_forward_hook(self._hook)

    def reset(self) -> None:
        """A new step: forget the previous one's micro-batches."""
        self.finished = []
        self._forget_schedule()

    def begin(self, mb: MicroBatch, weight: float) -> None:
        """The next forward is a training forward of micro-batch `mb` (this rank's share; the same
        object for every model chunk), its aux weighted by `weight` (1/(M·DP))."""
        routing = self._by_micro_batch.get(id(mb))
        if routing is None:
            mask = token_mask(mb, self.tp_rank, self.tp_size).to(self.device)
            routing = _MicroBatchRouting(mask, float(sum(mb.lengths)), weight, self.num_chunks)
            self._by_micro_batch[id(mb)] = routing
            self.finished.append(routing)
        self.current, self._forward_counts = routing, {}

    def end_forward(self) -> None:
        """After a training forward: post its layers' counts to the other pipeline stages."""
        routing, counts = self.current, self._forward_counts
        summed = torch.stack(list(counts.values())).sum(0).double() if counts else \
            torch.zeros(self.num_experts, dtype=torch.float64, device=self.device)
        tail = torch.tensor([len(counts), routing.tokens, routing.weight, self._serial], dtype=torch.float64,
                            device=summed.device)
        values = torch.cat([summed, tail])
        work = dist.all_reduce(values, group=self.pp_group, async_op=True) if self.pp_group is not None else None
        routing.exchanges.append(_Exchange(values, work, self._serial))
        self._serial += 1
        self.current, self._forward_counts = None, {}

    def end(self, completed: bool) -> None:
        """After a schedule. `completed`: wait for its exchanges (none stays in flight) and check
        that the stages' lined up; otherwise (the schedule raised) drop them."""
        try:
            if completed:
                self._check_exchanges()
        finally:
            self._forget_schedule()

    def values(self) -> list[float]:
        """transformers' aux (without the coefficient) of each micro-batch since `reset()`."""
        if not self.finished:
            return []
        zeros = torch.zeros(self.num_experts, device=self.device)
        prob_sums = torch.stack([torch.stack(list(r.prob_sums.values())).sum(0) if r.prob_sums else zeros
                                 for r in self.finished])
        for group in (self.token_group, self.pp_group):
            if group is not None:
                dist.all_reduce(prob_sums, group=group)
        values = []
        for routing, probs in zip(self.finished, prob_sums):
            fractions, layers = routing.pooled()
            pooled_probs = probs / (layers * routing.tokens)
            values.append(float(self.num_experts * (fractions * pooled_probs).sum()))
        return values

    def _check_exchanges(self) -> None:
        routings = list(self._by_micro_batch.values())
        for routing in routings:
            routing.totals()  # waits
        if self.pp_group is None or not routings:
            return
        got = torch.stack([e.values[1 - _TAIL:] for r in routings for e in r.exchanges]).cpu()
        want = self.pp_size * torch.tensor([[r.tokens, r.weight, e.serial] for r in routings for e in r.exchanges],
                                           dtype=torch.float64)
        if not torch.allclose(got, want, rtol=1e-12, atol=0.0):  # integers but w: exact up to w's summation
            raise RuntimeError("MoE aux loss: the pipeline stages' routing counts did not line up (each stage's "
                               f"[tokens, weight, serial] x {self.pp_size} {want.tolist()}, summed {got.tolist()}): "
                               "their training forwards ran in different orders or on different micro-batches, or "
                               "an earlier schedule stopped midway")

    def _forget_schedule(self) -> None:
        self._by_micro_batch.clear()
        self._recompute.clear()
        self.current, self._forward_counts = None, {}

    def _hook(self, router, inputs, output):
        probs, routing_map = output
        hidden = inputs[0].reshape(-1, inputs[0].shape[-1])
        queue = self._recompute[router]
        if torch.is_grad_enabled() and queue:
            routing = queue.pop(0)  # recomputation in backward: the oldest grad-free forward's micro-batch
            scores = torch.softmax(torch.nn.functional.linear(hidden, router.weight).float(), dim=-1)
            return _InjectAuxGradient.apply(probs, scores, routing, self.coeff), routing_map
        routing = self.current
        if routing is None:  # a forward-only pass
            return None
        if routing.mask.numel() != hidden.shape[0]:
            raise RuntimeError(f"MoE aux loss: the router saw {hidden.shape[0]} tokens, the micro-batch holds "
                               f"{routing.mask.numel()} on this rank (TP={self.tp_size})")
        scores = torch.softmax(torch.nn.functional.linear(hidden, router.weight).float(), dim=-1)  # [N, E]
        with torch.no_grad():
            counts = (routing_map.float() * routing.mask[:, None]).sum(0)
            if self.token_group is not None:
                dist.all_reduce(counts, group=self.token_group)
            self._forward_counts[router.layer_number] = counts
            routing.prob_sums[router.layer_number] = (scores * routing.mask[:, None]).sum(0)
        if not torch.is_grad_enabled():  # a checkpointed layer: its recomputation attaches the gradient
            queue.append(routing)
            return None
        return _InjectAuxGradient.apply(probs, scores, routing, self.coeff), routing_map
