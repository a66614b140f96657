"""Qwen3-MoE on the Megatron learner against transformers' model (issue 21).

A tiny random Qwen3-MoE (2 layers, 4 experts of width 16, top-2 with renormalised
probabilities, hidden 32, vocab 97) is built by transformers, its weights go through our HF →
Megatron mapping, and the learner at EP=1/TP=1 (one process), at EP=2, TP=2 (with sequence
parallelism, which megatron-core requires of MoE under TP) and PP=2 (two gloo ranks) and at
EP=2×TP=2 (four) must reproduce transformers' model on a batch of variable-length sequences:
- routing: every token of every layer goes to the same set of experts (the router's top-k);
- logits within 1e-5 absolute, the token-mean NLL within 1e-5;
- every parameter's gradient (mapped from HF's names) within 1e-5 of its largest entry.
The load-balancing loss is off (coefficient 0) so that the loss is the NLL alone.
fp32 throughout; observed at EP=2: logits 3e-7, loss 0, gradients 8e-7 relative (summation order).

A tiny random Qwen2-MoE (QKV bias, top-2 of the full softmax without renormalisation, a shared
expert of width 24 scaled by its sigmoid gate) goes through the same comparison at EP=2 and TP=2
(with sequence parallelism: the shared expert is TP-split, its gate replicated) on two ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rlsd_megatron.config import Config, OptimizerConfig, ParallelConfig, PrecisionConfig, RolloutConfig
from tests.hf_models import hf_checkpoint_state, random_hf_model, tiny_model
from tests.learner.test_parallel_parity import _logits_by_sequence, gather_vocab, make_sequences, nll_loss_fn

TOL = 1e-5
MODEL = tiny_model("qwen3_moe")
QWEN2_MOE = tiny_model("qwen2_moe")
LENGTHS = (9, 5, 12, 7)  # make_sequences' lengths


def hf_reference(model=MODEL) -> dict:
    """transformers' logits, NLL, gradients (canonical Megatron names) and each layer's chosen
    experts for `make_sequences`; also the canonical weights the learner loads."""
    from rlsd_megatron.models.hf_mapping import hf_to_megatron

    hf = random_hf_model(model)
    sequences = make_sequences(model.vocab_size)
    total_tokens = sum(len(s) - 1 for s in sequences)
    chosen: dict[tuple[int, int], torch.Tensor] = {}  # (sequence, layer) → top-k expert ids [L, k]
    current = {}

    def keep_choice(layer):
        def hook(module, args, output):
            chosen[(current["seq"], layer)] = output[2].detach()  # (router logits, weights, indices)
        return hook

    hooks = [block.mlp.gate.register_forward_hook(keep_choice(i)) for i, block in enumerate(hf.model.layers)]
    logits, loss = [], 0.0
    for index, seq in enumerate(sequences):
        current["seq"] = index
        out = hf(seq[None]).logits[0]
        logits.append(out.detach())
        loss = loss + torch.nn.functional.cross_entropy(out[:-1], seq[1:], reduction="sum") / total_tokens
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = hf_checkpoint_state(hf, {name: p.grad for name, p in hf.named_parameters()})
    return {
        "weights": dict(hf_to_megatron(hf_checkpoint_state(hf).__getitem__, model)),
        "grads": dict(hf_to_megatron(grads.__getitem__, model)),
        "logits": dict(enumerate(logits)),
        "loss": float(loss.detach()),
        "chosen": chosen,
    }


def run_layout(weights: dict, tp: int = 1, pp: int = 1, ep: int = 1, replay: dict | None = None,
               recompute: bool = False, model=MODEL, vpp: int | None = None, micro_batches_per_rank: int = 2) -> dict:
    """The learner at (tp, pp, ep), data-parallel over the rest, loaded with `weights`: logits per
    sequence, loss, canonical gradients and each layer's chosen experts per sequence. TP runs with
    sequence parallelism, which megatron-core requires of MoE under TP. With `replay` (sequence →
    recorded experts [L, layers, k]) the learner replays them (`rollout.routing_replay`) and also
    reports its routing of micro-batches without them (`free_chosen`) and the replay's changed share
    on its data-parallel rank; `recompute`: full activation recomputation, one layer at a time."""
    from megatron.core import parallel_state

    from rlsd_megatron.learner.batch import ROUTED_EXPERTS
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    vocab = model.vocab_size
    # clip_grad=0: no clipping, so the gradients are the loss's own.
    cfg = Config(model=model, parallel=ParallelConfig(tp=tp, pp=pp, vpp=vpp, ep=ep, sequence_parallel=tp > 1,
                                                      use_distributed_optimizer=False),
                 optimizer=OptimizerConfig(clip_grad=0.0), rollout=RolloutConfig(routing_replay=replay is not None),
                 precision=PrecisionConfig(recompute_granularity="full", recompute_method="uniform",
                                           recompute_num_layers=1) if recompute else PrecisionConfig())
    with model_parallel(tp=tp, pp=pp, vpp=vpp, ep=ep):
        learner = Learner(cfg)
        learner.load_full_state(weights)
        sequences = make_sequences(vocab)
        total_tokens = sum(len(s) - 1 for s in sequences)
        dp = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        mine = list(range(len(sequences)))[dp_rank::dp]
        # Several micro-batches per rank (accumulation); sequence indices kept to name the routing.
        batches = [mine[i::micro_batches_per_rank] for i in range(micro_batches_per_rank)]
        micro_batches = [learner.micro_batch([sequences[s] for s in batch],
                                             {ROUTED_EXPERTS: [replay[s] for s in batch]} if replay else None)
                         for batch in batches]
        routing, hooks = _record_routing(learner, batches)
        outputs = learner.forward(micro_batches, lambda logits, mb: {"logits": gather_vocab(logits, vocab)})
        for hook in hooks:
            hook.remove()
        extra = {}
        if replay is not None:  # the same learner on micro-batches without recorded experts
            free, hooks = _record_routing(learner, batches)
            learner.forward([learner.micro_batch([sequences[s] for s in batch]) for batch in batches],
                            lambda logits, mb: {})
            for hook in hooks:
                hook.remove()
            extra["free_chosen"] = free
        stats = learner.train_step(micro_batches, nll_loss_fn(vocab, total_tokens))
        if replay is not None:  # over the replayed forward and the training one (each counts once)
            extra["changed_frac"] = {dp_rank: learner.routing_replay.metrics()["rollout/routing_replay_changed_frac"]}
        counts = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        loss = torch.tensor(stats["loss"] if counts else 0.0, dtype=torch.float64)
        dist.all_reduce(loss)
        grads = learner.full_state(grads=True)
        logits = [out["logits"] for out in outputs] if outputs is not None else None
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (dp_rank, logits, routing, extra))
    by_dp = {rank_dp: rank_logits for rank_dp, rank_logits, _, _ in gathered if rank_logits is not None}
    chosen = {key: experts for _, _, routing, _ in gathered for key, experts in routing.items()}
    merged = {name: {k: v for *_, rank_extra in gathered for k, v in rank_extra[name].items()} for name in extra}
    return {"logits": _logits_by_sequence(by_dp, dp), "loss": float(loss), "grads": grads, "chosen": chosen, **merged}


def _record_routing(learner, batches: list[list[int]]):
    """Forward hooks on every local router: (sequence, global layer) → chosen experts [L, k]
    (sorted ids), for the micro-batches of `batches` (sequence indices) in order."""
    from megatron.core import parallel_state

    calls: dict[int, int] = {}
    routing: dict[tuple[int, int], torch.Tensor] = {}

    def hook_for(layer_number: int):
        def hook(module, args, output):
            routing_map = output[1]  # [s * b, experts] bool, sequence-major
            if module.config.sequence_parallel:  # this TP rank routed its slice of the positions
                group = parallel_state.get_tensor_model_parallel_group()
                slices = [torch.empty_like(routing_map) for _ in range(dist.get_world_size(group))]
                dist.all_gather(slices, routing_map.contiguous(), group=group)
                routing_map = torch.cat(slices)
            batch = batches[calls.get(layer_number, 0)]
            calls[layer_number] = calls.get(layer_number, 0) + 1
            per_token = routing_map.reshape(-1, len(batch), routing_map.shape[-1]).transpose(0, 1)
            for row, seq in enumerate(batch):
                experts = per_token[row, : LENGTHS[seq]].nonzero()[:, 1].reshape(LENGTHS[seq], -1)
                routing[(seq, layer_number)] = experts.detach().cpu()
        return hook

    hooks = []
    for chunk in learner.model:
        module = getattr(chunk, "module", chunk)
        for layer in module.decoder.layers:
            hooks.append(layer.mlp.router.register_forward_hook(hook_for(layer.layer_number - 1)))
    return routing, hooks


def assert_matches_hf(case: dict, ref: dict) -> None:
    assert sorted(case["chosen"]) == sorted(ref["chosen"])
    for key, experts in ref["chosen"].items():
        assert torch.equal(case["chosen"][key], experts.sort(dim=-1).values), f"routing of (sequence, layer) {key}"
    assert sorted(case["logits"]) == sorted(ref["logits"])
    for seq, want in ref["logits"].items():
        torch.testing.assert_close(case["logits"][seq], want, rtol=0, atol=TOL, msg=f"logits of sequence {seq}")
    assert case["loss"] == pytest.approx(ref["loss"], abs=TOL)
    assert sorted(case["grads"]) == sorted(ref["grads"])
    for name, want in ref["grads"].items():
        scale = want.abs().max().clamp_min(1e-12)
        diff = (case["grads"][name] - want).abs().max() / scale
        assert diff < TOL, f"grad {name}: relative diff {diff:.2e}"


def checked_reference(model) -> dict:
    """`hf_reference(model)` after checking the signal: routing is not degenerate (every expert of
    every layer gets tokens), so "same experts chosen" says something; and gradients reach every
    tensor."""
    ref = hf_reference(model)
    for layer in range(model.num_layers):
        used = torch.cat([ref["chosen"][(s, layer)].flatten() for s in range(len(LENGTHS))]).unique()
        assert used.tolist() == list(range(model.num_experts)), f"layer {layer} uses experts {used.tolist()}"
    assert all(grad.abs().max() > 0 for grad in ref["grads"].values())
    return ref


@pytest.fixture(scope="module")
def reference():
    return checked_reference(MODEL)


def test_single_process_matches_transformers(dist_pool, reference):
    case = dist_pool(1).run(run_layout, reference["weights"])[0]
    assert_matches_hf(case, reference)


def layouts_on_two_ranks(weights: dict, model=MODEL, layouts: tuple[str, ...] = ("ep2", "tp2", "pp2")) -> dict:
    kwargs = {"ep2": dict(ep=2), "tp2": dict(tp=2), "pp2": dict(pp=2)}
    return {layout: run_layout(weights, model=model, **kwargs[layout]) for layout in layouts}


def assert_layouts_match_hf(cases: dict, ref: dict) -> None:
    for layout, case in cases.items():
        try:
            assert_matches_hf(case, ref)
        except AssertionError as exc:
            raise AssertionError(f"{layout}: {exc}") from exc


def test_expert_tensor_and_pipeline_parallel_match_transformers(dist_pool, reference):
    assert_layouts_match_hf(dist_pool(2).run(layouts_on_two_ranks, reference["weights"], timeout=600)[0], reference)


def test_qwen2_moe_at_ep2_and_tp2_matches_transformers(dist_pool):
    """Qwen2-MoE's shared expert and gate, QKV biases and unrenormalised top-k at EP=2 and TP=2."""
    ref = checked_reference(QWEN2_MOE)
    cases = dist_pool(2).run(layouts_on_two_ranks, ref["weights"], QWEN2_MOE, ("ep2", "tp2"), timeout=600)[0]
    assert_layouts_match_hf(cases, ref)


def expert_and_tensor_parallel_on_four_ranks(weights: dict) -> dict:
    return run_layout(weights, tp=2, ep=2)


def test_expert_parallel_with_tensor_parallel_matches_transformers(dist_pool, reference):
    """EP=2 x TP=2 on four ranks: experts split over EP and each expert over TP (dense DP=2)."""
    case = dist_pool(4).run(expert_and_tensor_parallel_on_four_ranks, reference["weights"], timeout=600)[0]
    assert_matches_hf(case, reference)


def weights_after_one_step(weights: dict, distributed_optimizer: bool) -> dict:
    """Canonical weights after one AdamW step at EP=2 (dense DP=2, expert DP=1)."""
    from megatron.core import parallel_state

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    cfg = Config(model=MODEL, parallel=ParallelConfig(ep=2, use_distributed_optimizer=distributed_optimizer),
                 optimizer=OptimizerConfig(lr=1e-3, adam_eps=1e-4))
    with model_parallel(ep=2):
        learner = Learner(cfg)
        learner.load_full_state(weights)
        sequences = make_sequences(MODEL.vocab_size)
        total_tokens = sum(len(s) - 1 for s in sequences)
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        micro_batches = [learner.micro_batch(sequences[rank::dp][i::2]) for i in range(2)]
        learner.train_step(micro_batches, nll_loss_fn(MODEL.vocab_size, total_tokens))
        return learner.full_state()


def both_optimizers(weights: dict) -> tuple[dict, dict]:
    return weights_after_one_step(weights, False), weights_after_one_step(weights, True)


def test_distributed_optimizer_under_expert_parallelism(dist_pool, reference):
    """The distributed optimizer shards dense weights over DP and experts over expert-DP: one
    step gives the plain optimizer's weights (observed: bit-identical), and every tensor moves."""
    plain, sharded = dist_pool(2).run(both_optimizers, reference["weights"], timeout=600)[0]
    assert sorted(plain) == sorted(sharded) == sorted(reference["weights"])
    for name, weight in plain.items():
        torch.testing.assert_close(sharded[name], weight, rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(weight, reference["weights"][name]), f"{name} did not change"
