"""The CPU shims for megatron-core: each one's behaviour, and a guard that the learner's paths
(model, PP schedule, DDP, distributed optimizer, activation recomputation) never touch CUDA."""

from __future__ import annotations

import pytest
import torch

from rlsd_megatron.parallel.cpu_compat import CpuRNGStatesTracker, CudaToCpuMode


def test_tracker_fork_is_reproducible_and_restores_the_default_stream():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    expected_default = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("model-parallel-rng"):
        forked = torch.rand(3)
    assert torch.equal(torch.rand(3), expected_default)  # default stream untouched by the fork
    torch.manual_seed(123)
    assert torch.equal(forked, torch.rand(3))  # the fork draws from its own seed
    with tracker.fork("model-parallel-rng"):
        continued = torch.rand(3)
    assert not torch.equal(continued, forked)  # and advances


def test_tracker_states_round_trip_and_errors():
    tracker = CpuRNGStatesTracker()
    tracker.add("a", 1)
    states = tracker.get_states()
    with tracker.fork("a"):
        first = torch.rand(2)
    tracker.set_states(states)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(2), first)
    with pytest.raises(RuntimeError, match="already exists"):
        tracker.add("b", 1)
    with pytest.raises(RuntimeError, match="never added"):
        with tracker.fork("missing"):
            pass


def test_mode_maps_cuda_devices_to_cpu():
    with CudaToCpuMode():
        assert torch.empty(2, device="cuda").device.type == "cpu"
        assert torch.arange(3, device=0).device.type == "cpu"
        assert torch.zeros(1, device=torch.device("cuda", 0)).device.type == "cpu"
        x = torch.ones(2)
        assert x.cuda() is x
        assert x.to("cuda").device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"
        assert x.type(torch.float64).dtype == torch.float64  # explicit conversions untouched


def _recompute_case() -> dict:
    """TP=1, PP=2 train step with and without full activation recomputation."""
    from rlsd_megatron.config import Config, ModelConfig, ParallelConfig, PrecisionConfig
    from rlsd_megatron.learner.batch import padded_micro_batch
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    results = {}
    for recompute in ("none", "full"):
        cfg = Config(
            model=ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_attention_heads=4, ffn_hidden_size=64),
            parallel=ParallelConfig(pp=2),
            precision=PrecisionConfig(recompute_granularity=recompute,
                                      recompute_method="uniform" if recompute == "full" else None,
                                      recompute_num_layers=1 if recompute == "full" else None),
        )
        with model_parallel(pp=2, seed=5):
            learner = Learner(cfg)
            gen = torch.Generator().manual_seed(3)
            mbs = [padded_micro_batch([torch.randint(0, 64, (n,), generator=gen) for n in (6, 9)]) for _ in range(2)]

            def loss_fn(logits, mb):
                return (logits.float().logsumexp(-1) * mb.target_mask).sum() / 100.0, {}

            stats = learner.train_step(mbs, loss_fn)
            results[recompute] = (stats["grad_norm"], learner.full_state())
    results["cuda_initialized"] = torch.cuda.is_initialized()
    return results


def test_pipeline_ddp_and_recompute_run_without_cuda(dist_pool):
    for result in dist_pool(2).run(_recompute_case):
        assert not result["cuda_initialized"]
        norm_plain, weights_plain = result["none"]
        norm_recompute, weights_recompute = result["full"]
        assert norm_recompute == pytest.approx(norm_plain, rel=1e-6)
        for name, tensor in weights_plain.items():
            torch.testing.assert_close(weights_recompute[name], tensor, rtol=0, atol=1e-6)


def _bf16_case() -> dict:
    """bf16 params with fp32 main weights (Megatron's Float16 optimizer) vs fp32, TP=2, on CPU."""
    from rlsd_megatron.config import Config, ModelConfig, ParallelConfig, PrecisionConfig
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    losses = {}
    for dtype in ("fp32", "bf16"):
        cfg = Config(
            model=ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64),
            parallel=ParallelConfig(tp=2),
            precision=PrecisionConfig(params_dtype=dtype),
        )
        cfg.optimizer.lr = 1e-3
        with model_parallel(tp=2, seed=5):
            learner = Learner(cfg)
            gen = torch.Generator().manual_seed(3)
            mb = learner.micro_batch([torch.randint(0, 64, (n,), generator=gen) for n in (6, 9)])

            def loss_fn(logits, mb):
                from rlsd_megatron.ops import token_log_probs

                return -(token_log_probs(logits, mb.targets, vocab_size=64) * mb.target_mask).sum() / 13.0, {}

            losses[dtype] = [learner.train_step([mb], loss_fn)["loss"] for _ in range(3)]
            assert next(learner.model[0].parameters()).dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    return losses


def test_bf16_training_runs_on_cpu_and_tracks_fp32(dist_pool):
    losses = dist_pool(2).run(_bf16_case)[0]
    for lo32, lo16 in zip(losses["fp32"], losses["bf16"]):
        assert lo16 == pytest.approx(lo32, rel=2e-2)
    assert losses["bf16"][-1] < losses["bf16"][0]


def _buffered_send_case() -> list[float]:
    """Rank 0 sends in a p2p batch and waits on it, then meets rank 1 at a barrier; rank 1 posts its
    receive only after that barrier. With gloo's own sends (complete once received) this deadlocks;
    NCCL-like buffered sends let it through, and the tensor rank 0 overwrote meanwhile is not what
    arrives."""
    import torch.distributed as dist

    from rlsd_megatron.parallel.cpu_compat import install

    install()
    values = torch.tensor([1.0, 2.0, 3.0])
    if dist.get_rank() == 0:
        for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, values, 1)]):
            request.wait()
        values.fill_(-1.0)  # megatron frees a sent activation once the send is done
        dist.barrier()
    else:
        dist.barrier()
        for request in dist.batch_isend_irecv([dist.P2POp(dist.irecv, values.zero_(), 0)]):
            request.wait()
    return values.tolist()


def test_p2p_sends_are_buffered_as_on_nccl(dist_pool):
    """The interleaved pipeline schedule waits on its shape sends before the peer posts the receive
    (pp=4, vpp=2 hangs on gloo without this)."""
    assert dist_pool(2).run(_buffered_send_case, timeout=60)[1] == [1.0, 2.0, 3.0]
