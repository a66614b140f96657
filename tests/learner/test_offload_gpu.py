"""GPU: learner offload (`train.offload`) frees the learner's device memory and brings it back bit
for bit, with torch_memory_saver (`pip install -e .[gpu]`: sglang depends on it) and with the
copy path (pinned host buffers). One GPU; the CPU test (test_offload.py) covers the trainer
integration and the distributed optimizer."""

from __future__ import annotations

import pytest
import torch

from rlsd_megatron.config import Config, ModelConfig, PrecisionConfig
from tests.trainer.test_in_update import _optimizer_state

pytestmark = pytest.mark.gpu

# ~100M parameters: weights 0.2 GB (bf16) + fp32 grads 0.4 GB + main weights and Adam 1.2 GB.
MODEL = ModelConfig(family="qwen3", vocab_size=8192, hidden_size=1024, num_layers=6, num_attention_heads=16,
                    num_query_groups=4, kv_channels=64, ffn_hidden_size=4096, qk_layernorm=True)


def offload_round_trip(mode: str) -> dict:
    """Two optimizer steps of a learner offloaded (and back) between them against a resident
    learner with the same weights; the device memory the offload freed."""
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.learner.offload import LearnerOffload, allocation_region, create_optimizer_state
    from rlsd_megatron.ops import token_log_probs
    from rlsd_megatron.parallel.state import model_parallel

    cfg = Config(model=MODEL, precision=PrecisionConfig(params_dtype="bf16"))
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, MODEL.vocab_size, (n,), generator=gen) for n in (64, 48, 96)]
    with model_parallel(seed=3):
        with allocation_region(mode):
            learner = Learner(cfg, impl="local")
            create_optimizer_state(learner)  # the moments inside the region (torch_memory_saver)
        reference = Learner(cfg, impl="local")
        reference.load_full_state(learner.full_state())
        mb = learner.micro_batch(sequences)
        count = int(mb.target_mask.sum())

        def loss_fn(logits, mb):
            logp = token_log_probs(logits, mb.targets.to(logits.device), vocab_size=MODEL.vocab_size)
            return -(logp * mb.target_mask.to(logits.device)).sum() / count, {}

        offload = LearnerOffload(learner, mode)
        learner.train_step([mb], loss_fn)
        reference.train_step([mb], loss_fn)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info()[0]
        offload.offload()
        freed = torch.cuda.mem_get_info()[0] - free_before
        offload.onload()
        learner.train_step([mb], loss_fn)
        reference.train_step([mb], loss_fn)
        ours, theirs = learner.full_state(), reference.full_state()
        learner_bytes = sum(p.numel() * (p.element_size() + 4 + 12) for _, p in learner.named_parameters())
        return {"freed": freed, "learner_bytes": learner_bytes,
                "params_equal": all(torch.equal(ours[k], theirs[k]) for k in ours),
                "optimizer_equal": all(torch.equal(a, b) for a, b in zip(_optimizer_state(learner),
                                                                         _optimizer_state(reference))),
                "seconds": offload.last_seconds}


@pytest.mark.parametrize("mode", ["torch_memory_saver", "copy"])
def test_offload_frees_the_learner_and_restores_it_exactly(gpu_pool, mode):
    if mode == "torch_memory_saver":
        pytest.importorskip("torch_memory_saver")
    result = gpu_pool(1).run(offload_round_trip, mode)[0]
    # Weights, fp32 grads, fp32 main weights and Adam moments: ~18 bytes per parameter; the device
    # must get back at least 80% of them (allocator rounding, small tensors outside the buffers).
    assert result["freed"] >= 0.8 * result["learner_bytes"], result
    assert result["params_equal"] and result["optimizer_equal"], result
