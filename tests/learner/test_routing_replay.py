"""Routing replay (`rollout.routing_replay`, learner/routing_replay.py) against transformers.

The "engine" is the tiny Qwen3-MoE of test_moe_parity with its router weights perturbed, so that it
routes many tokens to other experts than the learner's weights would; its choices on the test
sequences (all tokens but each sequence's last, as an engine records them) are replayed by the
learner, which holds the unperturbed weights. The reference is transformers' model of those weights
whose routers are forced to the same experts, each weighted by the router's own softmax at them
(renormalised: norm_topk_prob), and free on the last tokens. At EP=2, TP=2 (sequence parallelism:
each rank routes a slice of the positions) and PP=2 with full activation recomputation (1F1B over
two micro-batches: micro-batch 1's forward runs before micro-batch 0's recomputation in backward,
which must still replay micro-batch 0's experts) the learner must give:
- the recorded experts for every recorded token (its own choice on the last ones);
- the reference's logits (1e-5), loss and every gradient, the router's included (1e-5 relative);
- its own free choice on micro-batches that carry no recorded experts (the teacher's forwards);
- `rollout/routing_replay_changed_frac`: the reference's share of changed routes.
The signal: the perturbed routing differs from the learner's own on >= 20% of (token, layer)
routes and moves the logits by > 1e-2, so none of this holds without replay.
"""

from __future__ import annotations

import pytest
import torch

from tests.hf_models import hf_checkpoint_state, random_hf_model, tiny_model
from tests.learner.test_moe_parity import LENGTHS, MODEL, assert_matches_hf, run_layout
from tests.learner.test_parallel_parity import make_sequences


def _routes(hf, sequences, forced: dict | None = None, model=MODEL) -> dict:
    """Forward every sequence through `hf` (loss: the token-mean NLL over all sequences, backward
    run); the routers take `forced[(s, layer)]` [L, k] where >= 0, else their own top-k. Returns
    logits, loss, canonical gradients, chosen experts (sorted) and the router's own top-k (sorted)
    per (sequence, layer)."""
    from rlsd_megatron.models.hf_mapping import hf_to_megatron

    current, chosen, own = {}, {}, {}

    def gate_forward(layer, gate):
        def forward(hidden):
            hidden = hidden.reshape(-1, gate.hidden_dim)
            logits = torch.nn.functional.linear(hidden, gate.weight)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            mine = probs.topk(gate.top_k, dim=-1).indices
            want = forced.get((current["seq"], layer)) if forced else None
            picked = mine if want is None else torch.where(want[:, :1] >= 0, want.long(), mine)
            values = probs.gather(1, picked)
            values = values / values.sum(-1, keepdim=True)  # norm_topk_prob (tiny_model's)
            chosen[(current["seq"], layer)] = picked.sort(-1).values.detach()
            own[(current["seq"], layer)] = mine.sort(-1).values.detach()
            return logits, values.to(logits.dtype), picked
        return forward

    for i, block in enumerate(hf.model.layers):
        block.mlp.gate.forward = gate_forward(i, block.mlp.gate)
    total_tokens = sum(len(s) - 1 for s in sequences)
    logits, loss = {}, 0.0
    hf.zero_grad()
    for index, seq in enumerate(sequences):
        current["seq"] = index
        out = hf(seq[None]).logits[0]
        logits[index] = out.detach()
        loss = loss + torch.nn.functional.cross_entropy(out[:-1], seq[1:], reduction="sum") / total_tokens
    loss.backward()
    grads = hf_checkpoint_state(hf, {name: p.grad for name, p in hf.named_parameters()})
    return {"logits": logits, "loss": float(loss.detach()), "grads": dict(hf_to_megatron(grads.__getitem__, model)),
            "chosen": chosen, "own": own}


def replay_reference(model) -> dict:
    """transformers' routes of `model`: its own, an engine's (perturbed routers) and the replay's."""
    from rlsd_megatron.models.hf_mapping import hf_to_megatron

    sequences = make_sequences(model.vocab_size)
    learner_hf = random_hf_model(model)
    weights = dict(hf_to_megatron(hf_checkpoint_state(learner_hf).__getitem__, model))
    free = _routes(learner_hf, sequences, model=model)
    engine_hf = random_hf_model(model)
    with torch.no_grad():
        torch.manual_seed(1)
        for block in engine_hf.model.layers:
            block.mlp.gate.weight.add_(torch.randn_like(block.mlp.gate.weight))
    engine = _routes(engine_hf, sequences, model=model)
    # What an engine records: every token but the last; the learner's field marks that one -1.
    unrecorded = torch.full((1, model.moe_router_topk), -1)
    replay = {s: torch.stack([torch.cat([engine["chosen"][(s, layer)][:-1], unrecorded])
                              for layer in range(model.num_layers)], dim=1).to(torch.int16)
              for s in range(len(sequences))}
    forced = {(s, layer): replay[s][:, layer] for s in range(len(sequences)) for layer in range(model.num_layers)}
    ref = _routes(random_hf_model(model), sequences, forced, model)
    ref["weights"], ref["replay"], ref["free"] = weights, replay, free
    # The signal: the engine's experts are not the learner's, and replaying them changes the logits.
    changed = [(ref["chosen"][key][:-1] != ref["own"][key][:-1]).any(-1) for key in sorted(ref["chosen"])]
    ref["changed_by_sequence"] = {
        s: (sum(int(c.sum()) for (seq, _), c in zip(sorted(ref["chosen"]), changed) if seq == s),
            model.num_layers * (LENGTHS[s] - 1)) for s in range(len(sequences))}
    share = sum(c for c, _ in ref["changed_by_sequence"].values()) / sum(n for _, n in ref["changed_by_sequence"].values())
    assert share >= 0.2, share
    assert max((ref["logits"][s] - free["logits"][s]).abs().max() for s in range(len(sequences))) > 1e-2
    for key, experts in ref["chosen"].items():  # forced where recorded, the router's own on the last token
        assert torch.equal(experts[:-1], replay[key[0]][:-1, key[1]].long().sort(-1).values)
        assert torch.equal(experts[-1], ref["own"][key][-1])
    return ref


@pytest.fixture(scope="module")
def reference():
    return replay_reference(MODEL)


def replayed_layouts(weights: dict, replay: dict) -> dict:
    return {"ep2+recompute": run_layout(weights, ep=2, replay=replay, recompute=True),
            "tp2": run_layout(weights, tp=2, replay=replay),
            "pp2+recompute": run_layout(weights, pp=2, replay=replay, recompute=True)}


def assert_replayed(case: dict, reference: dict, dp: int) -> None:
    assert_matches_hf(case, reference)  # chosen experts, logits, loss, every gradient
    for key, experts in reference["free"]["chosen"].items():
        assert torch.equal(case["free_chosen"][key], experts), f"free routing of (sequence, layer) {key}"
    for dp_rank, share in case["changed_frac"].items():
        counts = [reference["changed_by_sequence"][s] for s in range(len(LENGTHS))[dp_rank::dp]]
        assert share == pytest.approx(sum(c for c, _ in counts) / sum(n for _, n in counts), abs=1e-12)


def test_learner_replays_the_engines_experts(dist_pool, reference):
    cases = dist_pool(2).run(replayed_layouts, reference["weights"], reference["replay"], timeout=600)[0]
    for layout, case in cases.items():
        try:
            assert_replayed(case, reference, dp=2 if layout.startswith("ep2") else 1)
        except AssertionError as exc:
            raise AssertionError(f"{layout}: {exc}") from exc


def test_replay_under_the_interleaved_pipeline(dist_pool):
    """PP=4 x VPP=2 with full recomputation (8 layers, one sequence per micro-batch): each chunk's
    routers replay its micro-batches in the schedule's order, in forward and in recomputation."""
    model = tiny_model("qwen3_moe", num_layers=8)
    reference = replay_reference(model)
    case = dist_pool(4).run(run_layout, reference["weights"], pp=4, vpp=2, replay=reference["replay"],
                            recompute=True, model=model, micro_batches_per_rank=4, timeout=600)[0]
    assert_replayed(case, reference, dp=1)
