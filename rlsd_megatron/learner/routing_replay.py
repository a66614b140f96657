"""Routing replay (R3, `rollout.routing_replay`): the policy's routers use the experts the rollout
engine chose.

An MoE policy's engine and learner compute the router logits with different kernels (and SGLang in
bf16), so near-ties between experts fall differently and a token can go through other experts in the
learner than the ones that sampled it: its log-prob then differs by far more than numerics, which
the ratio, the TIS weight and the mismatch monitor all see. Replay removes that source (slime's R3,
veRL's router replay): the engine records each token's top-k expert ids per layer
(`Generation.routed_experts`), they travel with the rollouts into the micro-batches
(`learner.batch.ROUTED_EXPERTS`), and in the policy's forwards on those sequences every router
takes them instead of its own top-k. The weights of a token's experts are still the router's own
softmax at those experts (renormalised over them when `moe_norm_topk_prob`), so the router
weight gets its gradient as without replay; only the choice is the engine's. Tokens the engine
never ran (the last sampled one, padding) keep the router's own choice.

Which forwards replay: those whose micro-batches carry routed experts, i.e. the student's old
log-probs and the update (and the update's own student log-probs). The teacher's forward does
not: it scores the responses in its own context (the hinted prompt, so positions and attention
differ from the student's), and a frozen / EMA teacher is another policy whose routing the engine
never saw; the KL reference and the warm start route freely too.

The mechanism is megatron-core's `RouterReplay` (`moe/router_replay.py`), which the router's
top-k consults: `_EngineChoices` keeps one per router, fed per micro-batch by `RoutingReplay.begin`
from the schedule's forward step. A recomputed forward (full activation recomputation) runs in the
backward, after later micro-batches' forwards, so it takes its micro-batch's experts from
`RouterReplay`'s first-in-first-out list (per router, micro-batches are recomputed in forward
order), told apart by megatron's `is_checkpointing()` flag with gradients on (config_checks refuses
FP8 with full recomputation, where Transformer Engine's checkpoint does not raise that flag).
"""

from __future__ import annotations

import torch

from rlsd_megatron.learner.batch import MicroBatch


class _ReplayCounts:
    """(token, layer) routes replayed and how many of them the replay changed, on this rank; kept on
    the routers' device until read (no host sync per layer)."""

    def __init__(self):
        self.pending: list[torch.Tensor] = []

    def add(self, changed: torch.Tensor, routed: torch.Tensor) -> None:
        self.pending.append(torch.stack([changed, routed]).double())

    def take(self, device: torch.device) -> torch.Tensor:
        """[changed, routed] since the last call."""
        total = sum((t.to(device) for t in self.pending), torch.zeros(2, dtype=torch.float64, device=device))
        self.pending = []
        return total


def _router_replay_class():
    from megatron.core.transformer.moe.router_replay import RouterReplay

    class _EngineChoices(RouterReplay):
        """One router's replay: the engine's experts where recorded (>= 0), its own top-k elsewhere."""

        def __init__(self, counts: _ReplayCounts):
            super().__init__()
            # megatron-core's class-wide list feeds its static API (one list over every model the
            # process built: policy, teacher model, a test's earlier learners); we drive each router's
            # own instance, so ours stay off it.
            RouterReplay.global_router_replay_instances.remove(self)
            self.counts = counts

        def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            from megatron.core.tensor_parallel.random import is_checkpointing

            probs, own = default_compute_topk(scores, topk, num_groups, group_topk)
            recomputing = torch.is_grad_enabled() and is_checkpointing()
            recorded = self.replay_backward_list.pop(0) if recomputing else self.target_topk_idx
            if recorded is None:  # this micro-batch carries no engine routing: route freely
                return probs, own
            recorded = recorded.to(device=own.device, dtype=own.dtype)
            if recorded.shape != own.shape:
                raise RuntimeError(f"routing replay: the router of layer {self.layer_number} routes {tuple(own.shape)} "
                                   f"(tokens, top-k) but was given {tuple(recorded.shape)} recorded experts")
            known = recorded[:, :1] >= 0
            chosen = torch.where(known, recorded, own)
            if not recomputing:
                changed = (chosen.sort(dim=1).values != own.sort(dim=1).values).any(dim=1)
                self.counts.add(changed.sum(), known.sum())
            return scores.gather(1, chosen), chosen

    return _EngineChoices


class RoutingReplay:
    """Installs `_EngineChoices` on every router of `chunks` (this rank's model chunks, as the
    schedule passes them to the forward step). Per forward step: `begin(mb, chunk)`; after a
    schedule: `end()`; `metrics()` says how often the replay changed the routers' choice."""

    def __init__(self, chunks: list[torch.nn.Module], *, sequence_parallel: bool):
        from megatron.core import parallel_state

        engine_choices = _router_replay_class()
        self.counts = _ReplayCounts()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank() if sequence_parallel else 0
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1
        # id(chunk) → [(global layer index, its router's replay)]
        self.layers: dict[int, list[tuple[int, object]]] = {}
        for chunk in chunks:
            module = getattr(chunk, "module", chunk)
            replays = []
            for layer in module.decoder.layers:
                router = layer.mlp.router
                router.router_replay = engine_choices(self.counts)
                router.router_replay.layer_number = layer.layer_number
                replays.append((layer.layer_number - 1, router.router_replay))
            self.layers[id(chunk)] = replays

    def begin(self, mb: MicroBatch, chunk: torch.nn.Module) -> None:
        """`chunk`'s next forward is micro-batch `mb` (this rank's CP share): its routers replay
        `mb.routed_experts`, or choose themselves when it has none."""
        routed = mb.routed_experts
        rows = None
        if routed is not None:
            # The router's rows are megatron's [S, B] sequence-major tokens; under sequence
            # parallelism TP rank r routes the r-th slice of S.
            per_rank = routed.shape[1] // self.tp_size
            rows = routed.transpose(0, 1)[self.tp_rank * per_rank:(self.tp_rank + 1) * per_rank]
        for layer, replay in self.layers[id(chunk)]:
            if rows is None:
                replay.set_target_indices(None)
                continue
            if layer >= rows.shape[2]:
                raise RuntimeError(f"routing replay: the rollouts carry experts of {rows.shape[2]} layers, the model "
                                   f"has layer {layer + 1}; the engine and the learner must run the same model")
            replay.set_target_indices(rows[:, :, layer].reshape(-1, rows.shape[-1]))

    def end(self) -> None:
        """After a schedule: drop what is left of its micro-batches (forward-only passes and layers
        that were not recomputed never take their recomputation's entries)."""
        for replays in self.layers.values():
            for _, replay in replays:
                replay.clear_indices()

    def metrics(self) -> dict[str, float]:
        """`rollout/routing_replay_changed_frac`: the share of replayed (token, layer) routes where
        the engine's experts differ from the ones the learner's router would have chosen, over the
        policy forwards since the last call (all of this model replica's layers and tokens)."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        totals = self.counts.take(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                  else torch.device("cpu"))
        dist.all_reduce(totals, group=parallel_state.get_model_parallel_group())
        if parallel_state.get_context_parallel_world_size() > 1:  # CP ranks hold the other tokens
            dist.all_reduce(totals, group=parallel_state.get_context_parallel_group())
        return {"rollout/routing_replay_changed_frac": float(totals[0] / totals[1]) if totals[1] > 0 else 0.0}
