"""Mismatch monitor: statistics against hand-computed values, the threshold error, DP reduction."""

from __future__ import annotations

import pytest
import torch

from rlsd_megatron.rollout.mismatch import LogProbMismatchError, MismatchMonitor, logprob_mismatch


def test_statistics_over_masked_tokens():
    learner = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]])
    engine = torch.tensor([[-1.1, -2.0, -9.0], [-0.5, -0.05, 0.0]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    stats = logprob_mismatch(learner, engine, mask, version=4)
    assert stats.tokens == 3 and stats.version == 4
    assert stats.mean_abs == pytest.approx((0.1 + 0.0 + 0.2) / 3)
    assert stats.max_abs == pytest.approx(0.2)
    assert logprob_mismatch(learner, engine).max_abs == pytest.approx(6.0)
    assert logprob_mismatch(learner, engine, torch.zeros_like(mask)).tokens == 0


def test_masked_out_infinite_gap_does_not_leak():
    train = torch.tensor([[-1.0, -1.0, -3.0, 5.0]])
    rollout = torch.tensor([[-1.5, -0.5, -0.1, -torch.inf]])
    mask = torch.tensor([[1, 1, 1, 0]])  # integer masks are accepted too
    # |Δ| = [0.5, 0.5, 2.9] → mean 3.9/3 = 1.3, max 2.9.
    m = logprob_mismatch(train, rollout, mask)
    assert m.mean_abs == pytest.approx(1.3, abs=1e-6)
    assert m.max_abs == pytest.approx(2.9, abs=1e-6)
    assert m.tokens == 3


def test_threshold_turns_drift_into_an_error():
    monitor = MismatchMonitor(max_mean=0.05)
    ok = monitor.check(torch.zeros(4), torch.full((4,), 0.01))
    assert ok.mean_abs == pytest.approx(0.01) and monitor.last is ok
    with pytest.raises(LogProbMismatchError, match=r"mean \|logp_learner - logp_engine\| = 5.000e-01 over 4 tokens .*max_logprob_mismatch = 5.000e-02"):
        monitor.check(torch.zeros(4), torch.full((4,), 0.5), version=9)
    assert MismatchMonitor(None).check(torch.zeros(2), torch.ones(2)).mean_abs == 1.0
    with pytest.raises(ValueError, match="positive"):
        MismatchMonitor(0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        logprob_mismatch(torch.zeros(2), torch.zeros(3))


def two_rank_mismatch() -> tuple[float, float, int]:
    import torch.distributed as dist

    rank = dist.get_rank()
    learner = torch.zeros(2 + rank)
    engine = torch.full((2 + rank,), 0.1 * (rank + 1))
    stats = logprob_mismatch(learner, engine, group=dist.group.WORLD)
    return stats.mean_abs, stats.max_abs, stats.tokens


def test_reduction_over_data_parallel_ranks(dist_pool):
    for mean, peak, tokens in dist_pool(4).run(two_rank_mismatch):
        assert tokens == 2 + 3 + 4 + 5
        assert mean == pytest.approx((2 * 0.1 + 3 * 0.2 + 4 * 0.3 + 5 * 0.4) / 14)
        assert peak == pytest.approx(0.4)
