"""GPU learner tests (one H100, `pip install -e .[gpu]`): Transformer Engine layers, FP8, packed THD.

What is tested where: TP/PP/DP parity and the CP data layout run on CPU (gloo) in the other
files; here, on one GPU, the local spec on CUDA must give the logits of `transformers`' model on
the same weights and learn in bf16 (no TE needed), the TE layer spec in bf16 must reproduce the
local spec's logits on the same weights (also for Qwen3-MoE: TE's grouped-GEMM experts against the
local per-expert MLPs, under the same canonical names), FP8 (hybrid, each recipe) must train (finite loss and grads, loss close to bf16),
and packed THD batches must equal padded ones. CP=2 attention needs two GPUs (the last case skips
on one); its data layout (2·CP chunking, reassembly) is tested on CPU in test_batch.py.
"""

from __future__ import annotations

import pytest
import torch

from rlsd_megatron.config import Config, ModelConfig, PrecisionConfig

pytestmark = pytest.mark.gpu

MODEL = ModelConfig(family="qwen3", vocab_size=1000, hidden_size=256, num_layers=2, num_attention_heads=8,
                    num_query_groups=4, kv_channels=32, ffn_hidden_size=512, qk_layernorm=True)
# The same with 8 routed experts of width 128, top-2 (load-balancing loss off).
MOE_MODEL = ModelConfig(family="qwen3_moe", vocab_size=1000, hidden_size=256, num_layers=2, num_attention_heads=8,
                        num_query_groups=4, kv_channels=32, ffn_hidden_size=512, qk_layernorm=True, num_experts=8,
                        moe_router_topk=2, moe_ffn_hidden_size=128, moe_aux_loss_coeff=0.0)
# Qwen2-MoE's: QKV bias, top-2 not renormalised, a gated shared expert of width 256 (TE linears).
QWEN2_MOE_MODEL = ModelConfig(family="qwen2_moe", vocab_size=1000, hidden_size=256, num_layers=2, num_attention_heads=8,
                              num_query_groups=4, ffn_hidden_size=512, qkv_bias=True, num_experts=8, moe_router_topk=2,
                              moe_ffn_hidden_size=128, moe_norm_topk_prob=False, moe_aux_loss_coeff=0.0,
                              moe_shared_expert_intermediate_size=256)


def _sequences(lengths=(48, 32, 80)):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, MODEL.vocab_size, (n,), generator=gen) for n in lengths]


def _logits_per_sequence(learner, micro_batch):
    from megatron.core import parallel_state

    vocab = MODEL.vocab_size
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    (out,) = learner.forward([micro_batch], lambda logits, mb: {"logits": logits[..., :vocab].float()})
    return [seq_logits for seq_logits in _split(out["logits"], micro_batch)]


def _split(per_position, mb):
    rows = []
    for i, length in enumerate(mb.lengths):
        row, start = (0, mb.offsets[i]) if mb.packed_seq_params is not None else (i, 0)
        rows.append(per_position[row, start:start + length].cpu())
    return rows


def local_spec_vs_transformers_on_gpu() -> float:
    """Max |logits| difference, fp32, our local-spec learner on CUDA vs the HF model on CUDA."""
    from rlsd_megatron.learner.batch import padded_micro_batch
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.models.hf_mapping import hf_to_megatron
    from rlsd_megatron.parallel.state import model_parallel
    from tests.hf_models import random_hf_model

    hf = random_hf_model(MODEL)
    full = dict(hf_to_megatron(dict(hf.state_dict()).__getitem__, MODEL))
    hf = hf.cuda()
    sequences = _sequences()
    with torch.no_grad():
        want = [hf(seq[None].cuda()).logits[0].cpu() for seq in sequences]
    with model_parallel():
        learner = Learner(Config(model=MODEL), impl="local")
        assert next(learner.model[0].parameters()).is_cuda
        learner.load_full_state(full)
        got = _logits_per_sequence(learner, padded_micro_batch(sequences))
    return max(float((g - w).abs().max()) for g, w in zip(got, want))


def test_local_spec_on_gpu_matches_transformers(gpu_pool):
    difference = gpu_pool(1).run(local_spec_vs_transformers_on_gpu)[0]
    assert difference < 1e-4  # fp32 on both sides (the CPU test holds 1e-5); cuBLAS orders sums differently


def training_history(precision: PrecisionConfig, impl: str, *, lr: float, steps: int) -> list[tuple[float, float]]:
    """(loss, grad norm) of `steps` optimizer steps on one fixed batch (next-token loss)."""
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.ops import token_log_probs
    from rlsd_megatron.parallel.state import model_parallel

    cfg = Config(model=MODEL, precision=precision)
    cfg.optimizer.lr = lr
    with model_parallel(seed=3):
        learner = Learner(cfg, impl=impl)
        mb = learner.micro_batch(_sequences((64, 48, 96)))
        count = int(mb.target_mask.sum())

        def loss_fn(logits, mb):
            logp = token_log_probs(logits, mb.targets.to(logits.device), vocab_size=MODEL.vocab_size)
            return -(logp * mb.target_mask.to(logits.device)).sum() / count, {}

        history = [learner.train_step([mb], loss_fn) for _ in range(steps)]
    return [(h["loss"], h["grad_norm"]) for h in history]


def local_spec_bf16_training() -> list[tuple[float, float]]:
    return training_history(PrecisionConfig(params_dtype="bf16"), "local", lr=1e-3, steps=5)


def test_local_spec_trains_in_bf16_on_gpu(gpu_pool):
    history = gpu_pool(1).run(local_spec_bf16_training)[0]
    assert torch.isfinite(torch.tensor(history)).all(), history
    assert history[-1][0] < history[0][0] - 0.1, history  # five steps at lr 1e-3 on one batch: it memorises


def te_matches_local_bf16(model: ModelConfig = MODEL) -> tuple[float, list[str]]:
    """(relative logits difference of the TE spec on the local spec's weights, padded and packed;
    canonical names whose tensors the TE learner does not give back unchanged)."""
    from rlsd_megatron.learner.batch import packed_micro_batch, padded_micro_batch
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    cfg = Config(model=model, precision=PrecisionConfig(params_dtype="bf16"))
    with model_parallel():
        local = Learner(cfg, impl="local")
        full = local.full_state()
        te = Learner(cfg, impl="transformer_engine")
        te.load_full_state(full)
        back = te.full_state()
        want = _logits_per_sequence(local, padded_micro_batch(_sequences()))
        got_padded = _logits_per_sequence(te, padded_micro_batch(_sequences()))
        got_packed = _logits_per_sequence(te, packed_micro_batch(_sequences()))
    changed = sorted(name for name in full if name not in back or not torch.equal(back[name], full[name]))
    scale = max(float(w.abs().max()) for w in want)
    return max(
        max(float((g - w).abs().max()) for g, w in zip(got_padded, want)),
        max(float((g - w).abs().max()) for g, w in zip(got_packed, want)),
    ) / scale, changed


def test_te_spec_matches_local_spec_in_bf16(gpu_pool):
    relative, changed = gpu_pool(1).run(te_matches_local_bf16)[0]
    assert changed == []
    assert relative < 2e-2  # bf16 kernels differ (fused attention, GEMM order): ~1e-2 relative


def fp8_training(recipe: str) -> dict:
    return {fp8: training_history(PrecisionConfig(params_dtype="bf16", fp8=fp8, fp8_recipe=recipe), "transformer_engine",
                                  lr=1e-4, steps=3)
            for fp8 in ("none", "hybrid")}


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "blockwise"])
def test_fp8_hybrid_trains_close_to_bf16(gpu_pool, recipe):
    if recipe == "blockwise" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("blockwise FP8 needs Hopper or newer")
    losses = gpu_pool(1).run(fp8_training, recipe)[0]
    for (loss8, norm8), (loss16, _) in zip(losses["hybrid"], losses["none"]):
        assert torch.isfinite(torch.tensor([loss8, norm8])).all()
        assert abs(loss8 - loss16) / loss16 < 0.05
    assert losses["hybrid"][-1][0] < losses["hybrid"][0][0]  # it learns


def context_parallel_logits() -> float:
    """Max |logits(CP=2) − logits(CP=1)| / max |logits| on the same weights and packed batch."""
    from rlsd_megatron.config import ParallelConfig
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    results = {}
    full = None
    for cp in (1, 2):
        cfg = Config(model=MODEL, parallel=ParallelConfig(cp=cp), precision=PrecisionConfig(params_dtype="bf16"))
        with model_parallel(cp=cp, seed=4):
            learner = Learner(cfg, impl="transformer_engine")
            if full is None:
                full = learner.full_state()
            learner.load_full_state(full)
            mb = learner.micro_batch(_sequences((64, 32, 96)))
            results[cp] = _logits_per_sequence(learner, mb)
    scale = max(float(w.abs().max()) for w in results[1])
    return max(float((a - b).abs().max()) for a, b in zip(results[2], results[1])) / scale


def test_context_parallel_matches_single_gpu(gpu_pool):
    for relative in gpu_pool(2).run(context_parallel_logits):
        assert relative < 2e-2


@pytest.mark.parametrize("model", [MOE_MODEL, QWEN2_MOE_MODEL], ids=["qwen3_moe", "qwen2_moe"])
def test_te_grouped_experts_match_local_spec_in_bf16(gpu_pool, model):
    """Qwen3-MoE / Qwen2-MoE: Transformer Engine's grouped-GEMM experts (`TEGroupedMLP`, `weight{k}`
    names) and TE shared expert load the local spec's (`SequentialMLP`, local linears) weights under
    the same canonical names and give its logits."""
    relative, changed = gpu_pool(1).run(te_matches_local_bf16, model)[0]
    assert changed == []
    assert relative < 2e-2  # bf16 kernels differ, as for the dense TE spec
