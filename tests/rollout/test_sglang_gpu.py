"""SGLang backend on a GPU (`pytest -m gpu` on an H100 with `pip install -e .[gpu]`).

Engine start with dummy weights, weight sync from HF tensors and from a Megatron learner,
generation with log-probs compared to an independent forward of the same weights, stop tokens
and max length, seeded reproducibility, sleep / wake around a sync; FP8 rollout weights from a
learner into an FP8 engine, compared to a forward of the dequantised weights.

Every engine runs inside a `gpu_pool` worker, never in the pytest process: `Engine.shutdown`
SIGKILLs every child of the process that calls it (the pool workers included), and the workers
are daemonic, which multiprocessing forbids to start children until `allow_children()`.
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest
import torch

from rlsd_megatron.config import Config, ModelConfig, PrecisionConfig
from rlsd_megatron.rollout import MismatchMonitor, SamplingParams
from rlsd_megatron.rollout.buckets import pack_buckets
from tests.hf_models import random_hf_model

pytestmark = pytest.mark.gpu

# head_dim 64 and a vocabulary SGLang's kernels accept; bf16 end to end.
MODEL = ModelConfig(family="llama", vocab_size=512, hidden_size=256, num_layers=2, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=512, max_position_embeddings=1024)
PROMPTS = [[1, 5, 9, 13], [2, 4], [7, 7, 7, 8, 3]]
BF16_LOGPROB_TOL = 2e-2  # mean |Δ| between SGLang's bf16 kernels and a bf16 HF forward
# SGLang refuses FP8 pushes for Llama (sglang_engine), so FP8 runs a Qwen3; every projection's
# rows and columns are multiples of the 128x128 blocks, as SGLang's Fp8LinearMethod requires.
FP8_MODEL = ModelConfig(family="qwen3", vocab_size=512, hidden_size=256, num_layers=2, num_attention_heads=4,
                        num_query_groups=2, kv_channels=64, ffn_hidden_size=512, qk_layernorm=True,
                        max_position_embeddings=1024)
# Mean |Δ| against a bf16 forward of the dequantised weights: SGLang also quantises activations
# (e4m3 per token and 128 columns, relative error <= 2^-4 each). An estimate, not yet measured.
FP8_LOGPROB_TOL = 0.1


def allow_children() -> None:
    """Let this (daemonic) pool worker start SGLang's scheduler processes."""
    import multiprocessing

    multiprocessing.current_process().daemon = False


def hf_reference(seed: int):
    return random_hf_model(MODEL, seed=seed, dtype=torch.bfloat16).cuda()


def reference_log_probs(model, prompt, generated, temperature):
    seq = torch.tensor(prompt + generated, device="cuda")
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[None]).logits[0].float() / temperature, -1)
    return logp[len(prompt) - 1:-1].gather(1, seq[len(prompt):, None]).squeeze(1).cpu()


def check_against(model, generations, temperature):
    learner = torch.cat([reference_log_probs(model, PROMPTS[g.prompt_index], g.token_ids, temperature)
                         for g in generations])
    engine = torch.cat([torch.tensor(g.log_probs) for g in generations])
    return MismatchMonitor(max_mean=BF16_LOGPROB_TOL).check(learner, engine)


def sync_generate_sleep_wake() -> None:
    from rlsd_megatron.rollout.sglang_engine import SGLangEngine

    allow_children()
    # sglang 0.5.23 honours per-request sampling_seed only in deterministic inference mode.
    engine = SGLangEngine(MODEL, engine_tp=1, mem_fraction_static=0.2, dtype="bfloat16",
                          server_args={"enable_deterministic_inference": True, "disable_cuda_graph": True})
    try:
        first = hf_reference(0)
        engine.update_weights(pack_buckets(list(first.state_dict().items()), bucket_bytes=2**20), version=1)
        sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, stop_token_ids=(3, 4, 5), seed=11)
        generations = engine.generate(PROMPTS, sampling)
        assert len(generations) == 12 and engine.health().weight_version == 1
        for g in generations:
            assert 1 <= len(g.token_ids) <= 8 and len(g.log_probs) == len(g.token_ids)
            assert (g.finish_reason == "stop") == (g.token_ids[-1] in (3, 4, 5))
            assert g.finish_reason == "stop" or len(g.token_ids) == 8
        check_against(first, generations, 1.0)
        assert [g.token_ids for g in engine.generate(PROMPTS, sampling)] == [g.token_ids for g in generations]
        # srun delivers SLURM's stop signals to every process of the step (slurm/common.sh): the
        # engine's scheduler / detokenizer processes must outlive them (parallel/signals.py).
        children = psutil.Process().children(recursive=True)
        assert children
        for child in children:
            for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
                child.send_signal(sig)
        time.sleep(1.0)
        assert all(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)

        engine.sleep()
        second = hf_reference(1)
        engine.wake(["weights"])
        engine.update_weights(pack_buckets(list(second.state_dict().items()), bucket_bytes=2**20), version=2)
        engine.wake(["kv_cache", "cuda_graph"])
        again = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=6, seed=3))
        assert engine.health().weight_version == 2 and engine.health().ok
        check_against(second, again, 0.7)
    finally:
        engine.shutdown()


def test_sync_generate_sleep_wake(gpu_pool):
    pytest.importorskip("sglang", reason="needs the [gpu] extra (pip install -e .[gpu])")
    gpu_pool(1).run(sync_generate_sleep_wake, timeout=900)


def learner_to_sglang() -> dict:
    import torch.distributed as dist

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.models.hf_mapping import hf_to_megatron
    from rlsd_megatron.ops import token_log_probs
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.rollout import sync_weights
    from rlsd_megatron.rollout.sglang_engine import SGLangEngine

    allow_children()
    hf = hf_reference(0)
    full = {k: v.float().cpu() for k, v in hf_to_megatron(dict(hf.state_dict()).__getitem__, MODEL)}
    with model_parallel():
        learner = Learner(Config(model=MODEL, precision=PrecisionConfig(params_dtype="bf16")))
        learner.load_full_state(full)
        engine = SGLangEngine(MODEL, engine_tp=1, mem_fraction_static=0.3, dtype="bfloat16",
                              server_args={"disable_cuda_graph": True})
        try:
            stats = sync_weights(learner.model, MODEL, engine, version=5, bucket_bytes=2**20)
            generations = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=2))
        finally:
            engine.shutdown()
        sequences = [torch.tensor(PROMPTS[g.prompt_index] + g.token_ids) for g in generations]
        per_seq = learner.forward_sequences(sequences, lambda logits, m: {
            "logp": token_log_probs(logits, m.targets.to(logits.device), vocab_size=MODEL.vocab_size)})["logp"]
        learner_lp = torch.cat([lp[len(PROMPTS[g.prompt_index]):] for lp, g in zip(per_seq, generations)])
        engine_lp = torch.cat([torch.tensor(g.log_probs) for g in generations])
        mismatch = MismatchMonitor(max_mean=BF16_LOGPROB_TOL).check(learner_lp, engine_lp, version=5)
    dist.barrier()
    return {"mismatch": mismatch, "gb_per_s": stats.gb_per_s}


def test_learner_to_sglang_log_prob_parity(gpu_pool):
    pytest.importorskip("sglang", reason="needs the [gpu] extra (pip install -e .[gpu])")
    result = gpu_pool(1).run(learner_to_sglang, timeout=900)[0]
    assert result["mismatch"].tokens > 0 and result["mismatch"].mean_abs < BF16_LOGPROB_TOL


def learner_to_fp8_sglang() -> dict:
    import torch.distributed as dist

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.models.hf_mapping import hf_to_megatron
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.rollout import sync_weights
    from rlsd_megatron.rollout.fp8 import dequantize_fp8_blockwise, is_fp8_weight, quantize_fp8_blockwise
    from rlsd_megatron.rollout.sglang_engine import SGLangEngine

    allow_children()
    hf = random_hf_model(FP8_MODEL, seed=0, dtype=torch.bfloat16).cuda()
    full = {k: v.float().cpu() for k, v in hf_to_megatron(dict(hf.state_dict()).__getitem__, FP8_MODEL)}
    with model_parallel():
        learner = Learner(Config(model=FP8_MODEL, precision=PrecisionConfig(params_dtype="bf16")))
        learner.load_full_state(full)
        engine = SGLangEngine(FP8_MODEL, engine_tp=1, mem_fraction_static=0.3, dtype="bfloat16", fp8_weights=True,
                              server_args={"disable_cuda_graph": True})
        try:
            stats = sync_weights(learner.model, FP8_MODEL, engine, version=3, bucket_bytes=2**20)
            generations = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=2))
        finally:
            engine.shutdown()
    fp8 = engine.fp8_format
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if is_fp8_weight(name, fp8):
                param.copy_(dequantize_fp8_blockwise(*quantize_fp8_blockwise(param, fp8.block), fp8.block))
    engine_lp = torch.cat([torch.tensor(g.log_probs) for g in generations])

    def mean_abs_diff(model) -> float:
        reference = torch.cat([reference_log_probs(model, PROMPTS[g.prompt_index], g.token_ids, 1.0)
                               for g in generations])
        return float((reference - engine_lp).abs().mean())

    dist.barrier()
    return {"dequantised": mean_abs_diff(hf), "other": mean_abs_diff(random_hf_model(FP8_MODEL, seed=1,
                                                                                      dtype=torch.bfloat16).cuda()),
            "bytes": stats.bytes, "bf16_bytes": sum(t.numel() * 2 for t in full.values())}


def test_learner_to_fp8_sglang(gpu_pool):
    pytest.importorskip("sglang", reason="needs the [gpu] extra (pip install -e .[gpu])")
    result = gpu_pool(1).run(learner_to_fp8_sglang, timeout=900)[0]
    assert result["dequantised"] < FP8_LOGPROB_TOL, result
    assert result["other"] > 2 * result["dequantised"], result  # the scales arrived: other weights are farther
    assert result["bytes"] < 0.75 * result["bf16_bytes"], result  # projections moved as 1 byte per weight
