"""Argument checking, conventions and edge cases of the public ops (TP = 1, plain process)."""

from __future__ import annotations

import math

import pytest
import torch

from rlsd_megatron import ops


def test_errors_name_the_bad_value():
    z = torch.randn(3, 8)
    with pytest.raises(ValueError, match="vocab_size=9"):
        ops.token_log_probs(z, torch.zeros(3, dtype=torch.long), vocab_size=9)
    with pytest.raises(ValueError, match="temperature"):
        ops.token_log_probs(z, torch.zeros(3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="does not match logits"):
        ops.token_log_probs(z, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        ops.log_probs_at_ids(z, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="same shape"):
        ops.kl_divergence(z, torch.randn(3, 7))
    with pytest.raises(ValueError, match="beta"):
        ops.generalized_jsd(z, z, beta=1.5)
    with pytest.raises(ValueError, match="k must be"):
        ops.vocab_topk(z, 7, vocab_size=6)
    with pytest.raises(ValueError, match="support"):
        ops.topk_distillation_loss(z, z, 2, support="both")
    with pytest.raises(ValueError, match="chunk_size"):
        ops.kl_divergence(z, z, chunk_size=0)


def test_jsd_convention_and_end_points():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    torch.testing.assert_close(ops.generalized_jsd(s, t, beta=0.0), ops.kl_divergence(t, s))
    torch.testing.assert_close(ops.generalized_jsd(s, t, beta=1.0), ops.kl_divergence(s, t))
    # β = 0.5 is the symmetric Jensen–Shannon divergence, bounded by log 2
    jsd = ops.generalized_jsd(s, t, beta=0.5)
    torch.testing.assert_close(jsd, ops.generalized_jsd(t, s, beta=0.5))
    assert bool((jsd > 0).all()) and bool((jsd < math.log(2)).all())
    assert torch.allclose(ops.generalized_jsd(s, s, beta=0.3), torch.zeros(4), atol=1e-6)


def test_default_chunking_equals_explicit_chunks():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 9, 50, generator=gen)
    y = torch.randint(0, 50, (2, 9), generator=gen)
    a = ops.token_log_probs(z, y, return_entropy=True)
    b = ops.token_log_probs(z, y, return_entropy=True, chunk_size=4)
    for x, w in zip(a, b):
        torch.testing.assert_close(x, w, rtol=1e-6, atol=1e-6)


def test_tail_bucket_is_finite_when_top_k_holds_all_the_mass():
    z = torch.tensor([[30.0, 0.0, -30.0, -60.0]], requires_grad=True)
    loss = ops.topk_distillation_loss(z, z.detach() + 1e-3, 4, tail_bucket=True)
    loss.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
    lp = ops.append_tail_bucket(torch.log(torch.tensor([[0.5, 0.25]])))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(1))


def test_fully_padded_shard_and_empty_batch():
    # vocab_size smaller than the shard: columns >= vocab_size never count
    z = torch.randn(5, 16)
    y = torch.randint(0, 10, (5,))
    want = torch.log_softmax(z[:, :10], -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(ops.token_log_probs(z, y, vocab_size=10), want)
    empty = ops.token_log_probs(torch.randn(0, 16, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_no_group_outside_megatron_means_single_shard():
    from rlsd_megatron.ops.vocab_shard import resolve_group

    assert resolve_group(None) is None
