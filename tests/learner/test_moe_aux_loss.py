"""The MoE load-balancing loss (`learner.moe_aux_loss`) against transformers' `router_aux_loss_coef`.

A tiny random Qwen3-MoE (4 layers, 4 experts, top-2) with `model.moe_aux_loss_coeff` = 0.01 and a
zero main loss: the learner's gradient is then the load-balancing term's alone. Reference: four
right-padded micro-batches of two sequences each through transformers with their attention masks
(`output_router_logits=True`: its `aux_loss` pools every layer's routing over the real tokens);
the step's gradient must be 0.01 x the mean of the four micro-batches' aux gradients, whether the
four run on one replica (TP=2 with sequence parallelism; PP=2, where each stage routes two of the
layers and the counts cross stages) or on two (EP=2, DP=2: two each; PP=2 x EP=2 on four ranks):
the scale depends on neither the tokens, the micro-batches nor DP. At PP=2, 1F1B runs micro-batch m+1's forward before
m's backward, and the first layer of each stage is recomputed in backward (full recomputation,
block method: m's recomputation comes after m+1's forward too, the second layer is not
recomputed); a forward-only pass over the same micro-batches runs first and must leave nothing
behind; a stage whose exchanges are out of step with the other's (numbered one ahead) makes the
step fail instead. The reported `moe_aux_loss` (averaged over the ranks' micro-batches) equals
transformers' aux. fp32; gradients within 1e-5 of each tensor's largest entry (observed ~1e-7).
Context parallelism needs Transformer Engine (GPU): its token layout is tested here, the counts'
all-reduce over CP in test_gpu_learner.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rlsd_megatron.config import Config, OptimizerConfig, ParallelConfig, PrecisionConfig
from tests.hf_models import hf_checkpoint_state, random_hf_model, tiny_model

COEFF = 0.01
MODEL = tiny_model("qwen3_moe", num_layers=4, moe_aux_loss_coeff=COEFF)
LENGTHS = (9, 5, 12, 7, 6, 10, 8, 4)
TOL = 1e-5


def micro_batches() -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    sequences = [torch.randint(0, MODEL.vocab_size, (n,), generator=gen) for n in LENGTHS]  # same vocabulary at 8 layers
    return [sequences[i:i + 2] for i in range(0, len(sequences), 2)]


def hf_reference(model=MODEL) -> dict:
    """transformers' aux value per micro-batch and the gradient of COEFF x their mean."""
    from rlsd_megatron.models.hf_mapping import hf_to_megatron

    hf = random_hf_model(model)
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
    return {"weights": dict(hf_to_megatron(hf_checkpoint_state(hf).__getitem__, model)), "values": values,
            "grads": dict(hf_to_megatron(grads.__getitem__, model))}


def aux_gradient(weights: dict, tp: int = 1, ep: int = 1, pp: int = 1, cp: int = 1, recompute: str | None = None,
                 score_first: bool = False, impl: str = "local", params_dtype: str = "fp32", vpp: int | None = None,
                 model=MODEL) -> dict:
    """The learner's gradient and reported aux with a zero main loss; this replica's micro-batches.
    `recompute`: full activation recomputation of one layer (per stage: "block") or every layer one
    at a time ("uniform"); `score_first`: a forward-only pass over the same micro-batches first."""
    from megatron.core import parallel_state

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    cfg = Config(model=model, parallel=ParallelConfig(tp=tp, ep=ep, pp=pp, vpp=vpp, cp=cp, sequence_parallel=tp > 1,
                                                      use_distributed_optimizer=False),
                 optimizer=OptimizerConfig(clip_grad=0.0),
                 precision=PrecisionConfig(params_dtype=params_dtype,
                                           recompute_granularity="full" if recompute else "none",
                                           recompute_method=recompute, recompute_num_layers=1 if recompute else None))
    with model_parallel(tp=tp, ep=ep, pp=pp, vpp=vpp, cp=cp):
        learner = Learner(cfg, impl=impl)
        learner.load_full_state(weights)
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        mine = [learner.micro_batch(batch) for batch in micro_batches()[dp_rank::dp]]
        if score_first:
            learner.forward(mine, lambda logits, mb: {})
        stats = learner.train_step(mine, lambda logits, mb: (logits.sum() * 0.0, {}))
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, stats["moe_aux_loss"])
        return {"grads": learner.full_state(grads=True), "aux": sum(values) / len(values)}


@pytest.fixture(scope="module")
def reference():
    ref = hf_reference()
    assert all(grad.abs().max() > 0 for name, grad in ref["grads"].items() if "router" in name)
    return ref


def assert_matches_reference(layout: str, case: dict, reference: dict, tol: float = TOL) -> None:
    assert case["aux"] == pytest.approx(sum(reference["values"]) / len(reference["values"]), rel=tol), layout
    assert sorted(case["grads"]) == sorted(reference["grads"])
    reached = 0
    for name, want in reference["grads"].items():
        scale = want.abs().max()
        if scale == 0:  # after the last router: the aux loss does not reach them
            assert case["grads"][name].abs().max() == 0, (layout, name)
            continue
        reached += 1
        diff = (case["grads"][name].float() - want.float()).abs().max() / scale
        assert diff < tol, f"{layout}: grad {name}: relative diff {diff:.2e}"
    assert reached > 10, layout  # routers, attention and the layers below's experts


def test_gradient_and_value_are_transformers_aux_at_any_layout(dist_pool, reference):
    cases = dist_pool(2).run(run_layouts, reference["weights"], timeout=600)[0]
    for layout, case in cases.items():
        assert_matches_reference(layout, case, reference)


def context_parallel_layouts(weights: dict) -> dict:
    bf16_te = dict(impl="transformer_engine", params_dtype="bf16")
    return {"dp2": aux_gradient(weights, **bf16_te), "cp2": aux_gradient(weights, cp=2, **bf16_te)}


@pytest.mark.gpu
def test_context_parallel_gradient_and_value_match_data_parallel(gpu_pool, reference):
    """CP=2 (two GPUs, Transformer Engine, packed THD): each CP rank routes its two chunks of every
    sequence and the counts are all-reduced over CP as over TP. In bf16 (TE's attention under CP
    needs it) against the same learner at DP=2 on the same GPUs, within 2e-2 as CP's logits test
    (and both's aux within 2e-2 of transformers' fp32 value)."""
    cases = gpu_pool(2).run(context_parallel_layouts, reference["weights"], timeout=600)[0]
    assert cases["dp2"]["aux"] == pytest.approx(sum(reference["values"]) / len(reference["values"]), rel=2e-2)
    assert_matches_reference("cp2", cases["cp2"], {**reference, "grads": cases["dp2"]["grads"]}, tol=2e-2)


def run_layouts(weights: dict) -> dict:
    return {"tp2": aux_gradient(weights, tp=2), "ep2": aux_gradient(weights, ep=2),
            "pp2+recompute": aux_gradient(weights, pp=2, recompute="block", score_first=True)}


def stages_out_of_step(weights: dict) -> str:
    """PP=2 where the last stage's exchanges are numbered one ahead, as after a schedule that stopped
    midway on one stage: the step must refuse its counts (the error's text)."""
    from megatron.core import parallel_state

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    with model_parallel(pp=2):
        learner = Learner(Config(model=MODEL, parallel=ParallelConfig(pp=2)))
        learner.load_full_state(weights)
        if parallel_state.is_pipeline_last_stage():
            learner.load_balancing._serial += 1
        try:
            learner.train_step([learner.micro_batch(batch) for batch in micro_batches()],
                               lambda logits, mb: (logits.sum() * 0.0, {}))
        except RuntimeError as error:
            return str(error)
        return "no error"


def test_stages_out_of_step_are_refused(dist_pool, reference):
    for message in dist_pool(2).run(stages_out_of_step, reference["weights"], timeout=600):
        assert "the pipeline stages' routing counts did not line up" in message, message


def test_token_mask_follows_the_context_parallel_split():
    """Each CP rank's (and, under sequence parallelism, each TP rank's) mask of real tokens, put
    back at its positions, is the micro-batch's own, padded ([B, S]) and packed (THD)."""
    from rlsd_megatron.learner.batch import cp_merge, cp_split, packed_micro_batch, padded_micro_batch
    from rlsd_megatron.learner.moe_aux_loss import token_mask

    sequences = micro_batches()[0] + micro_batches()[1]
    lengths = torch.tensor([len(s) for s in sequences])
    padded = padded_micro_batch(sequences, pad_to_multiple=8)
    packed = packed_micro_batch(sequences, pad_to_multiple=4, pad_total_to_multiple=16)
    width = padded.tokens.shape[1]
    assert torch.equal(token_mask(padded, 0, 1).reshape(width, -1).t(),
                       (torch.arange(width)[None] < lengths[:, None]).float())
    for mb in (padded, packed):
        rows, width = mb.tokens.shape
        full = token_mask(mb, 0, 1).reshape(width, rows).t()
        assert full.sum() == lengths.sum()
        shards, indices = [], []
        for cp_rank in range(2):
            local = cp_split(mb, 2, cp_rank)
            tp_slices = [token_mask(local, tp_rank, 2).reshape(-1, rows) for tp_rank in range(2)]
            shards.append(torch.cat(tp_slices).t())
            indices.append(local.cp_index)
        assert torch.equal(cp_merge(shards, indices, width), full)


def test_pipeline_and_expert_parallel_together(dist_pool, reference):
    """PP=2 x EP=2 on four ranks (DP=2: two micro-batches per replica, still interleaved by 1F1B):
    each pipeline group (one per data-parallel rank) exchanges its own replica's counts."""
    case = dist_pool(4).run(aux_gradient, reference["weights"], pp=2, ep=2, timeout=600)[0]
    assert_matches_reference("pp2xep2", case, reference)


def test_interleaved_pipeline(dist_pool):
    """PP=4 x VPP=2 (8 layers: each rank routes two layers, one in each of its chunks, with the
    first layer of each chunk recomputed in backward): the interleaved schedule runs every
    micro-batch's chunk-0 forwards before its chunk-1 forwards and backwards in reverse, and the
    counts still meet across all eight chunks."""
    model = tiny_model("qwen3_moe", num_layers=8, moe_aux_loss_coeff=COEFF)
    reference = hf_reference(model)
    case = dist_pool(4).run(aux_gradient, reference["weights"], pp=4, vpp=2, recompute="block", score_first=True,
                            model=model, timeout=600)[-1]
    assert_matches_reference("pp4xvpp2+recompute", case, reference)
