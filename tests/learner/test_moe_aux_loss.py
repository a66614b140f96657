"""The MoE load-balancing loss (`learner.moe_aux_loss`) against transformers' `router_aux_loss_coef`.

A tiny random Qwen3-MoE (2 layers, 4 experts, top-2) with `model.moe_aux_loss_coeff` = 0.01 and a
zero main loss: the learner's gradient is then the load-balancing term's alone. Reference: four
right-padded micro-batches of two sequences each through transformers with their attention masks
(`output_router_logits=True`: its `aux_loss` pools every layer's routing over the real tokens);
the step's gradient must be 0.01 x the mean of the four micro-batches' aux gradients, whether the
four run on one replica (TP=2 with sequence parallelism, DP=1: four micro-batches) or on two
(EP=2, DP=2: two each) — the scale depends on neither the tokens, the micro-batches nor DP.
(Full activation recomputation is not covered: megatron's recomputed all-to-all needs CUDA.)
The reported `moe_aux_loss` (averaged over the ranks' micro-batches) equals transformers' aux.
fp32; gradients within 1e-5 of each tensor's largest entry (observed ~1e-7).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rlsd_megatron.config import Config, OptimizerConfig, ParallelConfig
from tests.hf_models import hf_checkpoint_state, random_hf_model, tiny_model

COEFF = 0.01
MODEL = tiny_model("qwen3_moe", moe_aux_loss_coeff=COEFF)
LENGTHS = (9, 5, 12, 7, 6, 10, 8, 4)
TOL = 1e-5


def micro_batches() -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    sequences = [torch.randint(0, MODEL.vocab_size, (n,), generator=gen) for n in LENGTHS]
    return [sequences[i:i + 2] for i in range(0, len(sequences), 2)]


def hf_reference() -> dict:
    """transformers' aux value per micro-batch and the gradient of COEFF x their mean."""
    from rlsd_megatron.models.hf_mapping import hf_to_megatron

    hf = random_hf_model(MODEL)
    values = []
    batches = micro_batches()
    for batch in batches:
        width = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
        out = hf(input_ids=ids, attention_mask=mask, output_router_logits=True)
        (COEFF * out.aux_loss / len(batches)).backward()
        values.append(float(out.aux_loss.detach()))
    # Nothing after the last router (its layer's experts, the final norm, the head) gets a gradient.
    grads = hf_checkpoint_state(hf, {name: p.grad if p.grad is not None else torch.zeros_like(p)
                                     for name, p in hf.named_parameters()})
    return {"weights": dict(hf_to_megatron(hf_checkpoint_state(hf).__getitem__, MODEL)), "values": values,
            "grads": dict(hf_to_megatron(grads.__getitem__, MODEL))}


def aux_gradient(weights: dict, tp: int = 1, ep: int = 1) -> dict:
    """The learner's gradient and reported aux with a zero main loss; this replica's micro-batches."""
    from megatron.core import parallel_state

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    cfg = Config(model=MODEL, parallel=ParallelConfig(tp=tp, ep=ep, sequence_parallel=tp > 1,
                                                      use_distributed_optimizer=False),
                 optimizer=OptimizerConfig(clip_grad=0.0))
    with model_parallel(tp=tp, ep=ep):
        learner = Learner(cfg)
        learner.load_full_state(weights)
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        mine = micro_batches()[dp_rank::dp]
        stats = learner.train_step([learner.micro_batch(batch) for batch in mine],
                                   lambda logits, mb: (logits.sum() * 0.0, {}))
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, stats["moe_aux_loss"])
        return {"grads": learner.full_state(grads=True), "aux": sum(values) / len(values)}


@pytest.fixture(scope="module")
def reference():
    ref = hf_reference()
    assert all(grad.abs().max() > 0 for name, grad in ref["grads"].items() if "router" in name)
    return ref


def test_gradient_and_value_are_transformers_aux_at_any_layout(dist_pool, reference):
    cases = dist_pool(2).run(run_layouts, reference["weights"], timeout=600)[0]
    for layout, case in cases.items():
        assert case["aux"] == pytest.approx(sum(reference["values"]) / len(reference["values"]), rel=1e-5), layout
        assert sorted(case["grads"]) == sorted(reference["grads"])
        reached = 0
        for name, want in reference["grads"].items():
            scale = want.abs().max()
            if scale == 0:  # after the last router: the aux loss does not reach them
                assert case["grads"][name].abs().max() == 0, (layout, name)
                continue
            reached += 1
            diff = (case["grads"][name] - want).abs().max() / scale
            assert diff < TOL, f"{layout}: grad {name}: relative diff {diff:.2e}"
        assert reached > 10, layout  # routers, attention and the layer below's experts


def run_layouts(weights: dict) -> dict:
    return {"tp2": aux_gradient(weights, tp=2), "ep2": aux_gradient(weights, ep=2)}
