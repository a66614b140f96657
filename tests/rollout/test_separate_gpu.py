"""`rollout.placement=separate` on GPUs (`pytest -m gpu`, two GPUs): the weight broadcast runs over
NCCL (CUDA buckets, the same code as the gloo CPU path), and the engine rank generates what an
engine holding the sent weights generates."""

from __future__ import annotations

import pytest
import torch

from rlsd_megatron.config import ModelConfig
from tests.hf_models import random_hf_model

pytestmark = pytest.mark.gpu

MODEL = ModelConfig(family="llama", vocab_size=512, hidden_size=256, num_layers=2, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=512, max_position_embeddings=1024)
PROMPTS = [[1, 5, 9, 13], [2, 4]]


def push_and_generate() -> dict:
    """Rank 0 pushes a random model's HF tensors from CUDA buckets (1 MiB each) and asks for greedy
    samples; rank 1 serves with an embedded engine and returns what it holds."""
    from rlsd_megatron.parallel.state import engine_rank_list, is_engine_rank, model_parallel, weight_broadcast_group
    from rlsd_megatron.rollout.buckets import pack_buckets
    from rlsd_megatron.rollout.embedded import EmbeddedEngine
    from rlsd_megatron.rollout.engine import SamplingParams
    from rlsd_megatron.rollout.separate import RemoteEngine, serve_engine

    with model_parallel(engine_ranks=1):
        if is_engine_rank():
            engine = EmbeddedEngine(MODEL)
            serve_engine(engine, weight_broadcast_group())
            return {"weights": {n: t.clone() for n, t in engine.writable_weights().items()}}
        state = {n: t.cuda() for n, t in random_hf_model(MODEL, seed=3).state_dict().items()
                 if n != "lm_head.weight" or not MODEL.tie_word_embeddings}
        remote = RemoteEngine(engine_rank_list()[:1], engine_rank_list(), weight_group=weight_broadcast_group(),
                              sends_weights=True)
        remote.update_weights(pack_buckets(list(state.items()), bucket_bytes=2**20, device="cuda"), version=5)
        generations = remote.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
        remote.shutdown()
        return {"sent": {n: t.cpu() for n, t in state.items()}, "generations": generations}


def test_nccl_weight_broadcast_to_an_engine_rank(gpu_pool):
    from rlsd_megatron.rollout.embedded import EmbeddedEngine
    from rlsd_megatron.rollout.engine import SamplingParams

    sender, engine = gpu_pool(2).run(push_and_generate, timeout=600)
    assert set(engine["weights"]) == set(sender["sent"])
    for name, tensor in sender["sent"].items():
        assert torch.equal(engine["weights"][name], tensor), name  # fp32 bytes moved unchanged
    reference = EmbeddedEngine(MODEL)
    with torch.no_grad():
        for name, param in reference.writable_weights().items():
            param.copy_(sender["sent"][name])
    expected = reference.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
    assert [g.token_ids for g in sender["generations"]] == [g.token_ids for g in expected]
