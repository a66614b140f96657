"""Policy surrogate, loss aggregation, global normalisation and KL estimators."""

import math

import pytest
import torch

from rlsd_megatron.algorithms import aggregate_loss, kl_penalty, loss_normalisers, policy_loss
from tests.algorithms.global_normalisation import full_batch_loss_and_grad, make_batch, split_loss_and_grad

TOL = dict(rtol=0, atol=1e-6)  # float32 on O(1) values
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _hand_batch():
    # Row 0: (Â, r) = (1, 1.5), (1, 0.5), (−1, 0.5); row 1: (−1, 4.0), (−2, 1.1), padding.
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, -2.0, 0.0]])
    ratio = torch.tensor([[1.5, 0.5, 0.5], [4.0, 1.1, 1.0]])
    old = torch.full((2, 3), -2.0)
    logp = (old + ratio.log()).requires_grad_()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logp, old, adv, mask


def test_policy_loss_hand_values_token_mean():
    logp, old, adv, mask = _hand_batch()
    # clip range [0.8, 1.28], dual clip 3:
    #  (1, 1.5):  max(−1.5, −1.28) = −1.28  (clipped high, no gradient)
    #  (1, 0.5):  max(−0.5, −0.8)  = −0.5   (unclipped: low side only clips Â < 0)
    #  (−1, 0.5): max(0.5, 0.8)    = 0.8    (clipped low, no gradient)
    #  (−1, 4.0): max(4.0, 1.28) = 4.0 → dual: min(4.0, 3.0) = 3.0 (no gradient)
    #  (−2, 1.1): max(2.2, 2.2)    = 2.2
    # token-mean = (−1.28 − 0.5 + 0.8 + 3.0 + 2.2) / 5 = 4.22 / 5 = 0.844
    loss, m = policy_loss(logp, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor(0.844), **TOL)
    loss.backward()
    # dL/dlogp = −Â·r / 5 on unclipped tokens: (1, 0.5) → −0.1; (−2, 1.1) → 0.44; others 0.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.1, 0.0], [0.0, 0.44, 0.0]]), **TOL)
    # Metrics over the 5 tokens: clip high 1/5, clip low 1/5, dual 1/5, ratios 1.5, 0.5, 0.5, 4.0, 1.1.
    # approx_kl = mean((r − 1) − ln r) = (0.094535 + 0.193147 + 0.193147 + 1.613706 + 0.004690) / 5
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 0.5, 4.0, 1.1)) / 5  # 0.419845
    expected = {"clip_frac": 0.4, "clip_frac_low": 0.2, "clip_frac_high": 0.2, "dual_clip_frac": 0.2,
                "approx_kl": expected_kl, "ratio_mean": 7.6 / 5, "ratio_max": 4.0, "ratio_min": 0.5, "num_tokens": 5}
    for key, value in expected.items():
        assert m[key].item() == pytest.approx(value, abs=1e-5), key
        assert not m[key].requires_grad


def test_policy_loss_hand_values_other_aggregations():
    logp, old, adv, mask = _hand_batch()
    # No dual clip: token (−1, 4.0) keeps 4.0 → (4.22 + 1.0) / 5 = 1.044.
    loss, m = policy_loss(logp, old, adv, mask, dual_clip=None)
    torch.testing.assert_close(loss, torch.tensor(1.044), **TOL)
    assert m["dual_clip_frac"] == 0
    # seq-mean-token-mean: row 0 (−1.28 − 0.5 + 0.8)/3 = −0.326667, row 1 (3.0 + 2.2)/2 = 2.6;
    #   mean = (−0.326667 + 2.6)/2 = 1.136667.
    loss, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(loss, torch.tensor((-0.98 / 3 + 2.6) / 2), **TOL)
    # Dr.GRPO, C = 4: (−0.98 + 5.2) / (2 seqs · 4) = 0.5275.
    loss, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm", norm_constant=4)
    torch.testing.assert_close(loss, torch.tensor(0.5275), **TOL)
    # Global normalisers replace the local counts: token-mean with N = 10 → 4.22 / 10.
    loss, _ = policy_loss(logp, old, adv, mask, global_token_count=10)
    torch.testing.assert_close(loss, torch.tensor(0.422), **TOL)


def test_is_weights_scale_the_per_token_loss():
    logp, old, adv, mask = _hand_batch()
    w = torch.tensor([[2.0, 1.0, 1.0], [1.0, 0.5, 0.0]])
    # (−1.28·2 − 0.5 + 0.8 + 3.0 + 2.2·0.5) / 5 = 1.84 / 5 = 0.368
    loss, _ = policy_loss(logp, old, adv, mask, is_weights=w)
    torch.testing.assert_close(loss, torch.tensor(0.368), **TOL)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_ratio_one_and_constant_advantage_reduce_to_minus_advantage(agg):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g) * 3
    logp = old.clone().requires_grad_()
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 1, 5])[:, None]
    for c in (0.7, -1.3):
        loss, m = policy_loss(logp, old, torch.full((4, 6), c), mask, agg=agg)
        torch.testing.assert_close(loss, torch.tensor(-c), **TOL)
        assert m["clip_frac"] == 0 and m["ratio_mean"] == 1 and m["approx_kl"] == 0
    # Dr.GRPO equals it too when every response has the constant's length.
    full = torch.ones(4, 6, dtype=torch.bool)
    loss, _ = policy_loss(logp, old, torch.full((4, 6), 0.7), full, agg="seq-mean-token-sum-norm", norm_constant=6)
    torch.testing.assert_close(loss, torch.tensor(-0.7), **TOL)


def test_masked_positions_never_leak():
    logp, old, adv, mask = _hand_batch()
    with torch.no_grad():
        logp[1, 2] = torch.inf
    old = old.clone()
    old[1, 2] = -torch.inf
    adv = adv.clone()
    adv[1, 2] = torch.nan
    loss, m = policy_loss(logp, old, adv, mask, is_weights=torch.where(mask, 1.0, torch.nan))
    torch.testing.assert_close(loss, torch.tensor(0.844), **TOL)
    assert all(torch.isfinite(v) for v in m.values())
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.1, 0.0], [0.0, 0.44, 0.0]]), **TOL)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", range(3))
def test_micro_batches_with_global_normalisers_match_full_batch(agg, seed):
    batch = make_batch(seed)
    full_loss, full_grad = full_batch_loss_and_grad(batch, agg)
    split_loss, split_grad = split_loss_and_grad(batch, [[0, 1], [2], [3, 4, 5]], agg)
    torch.testing.assert_close(split_loss, full_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(split_grad, full_grad, rtol=0, atol=1e-6)
    assert full_grad.abs().sum() > 0


def test_per_micro_batch_normalisation_would_be_wrong():
    # The bug global normalisation prevents: token-mean per micro-batch overweights short ones.
    batch = make_batch(0)
    _, full_grad = full_batch_loss_and_grad(batch, "token-mean")
    _, local_grad = split_loss_and_grad(batch, [[0, 1], [2], [3, 4, 5]], "token-mean", use_global=False)
    assert not torch.allclose(local_grad, full_grad, atol=1e-4)


def test_loss_normalisers_count_tokens_and_non_empty_rows():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    n = loss_normalisers(mask)
    assert n["global_token_count"].item() == 3 and n["global_seq_count"].item() == 2


def test_aggregate_and_policy_loss_errors():
    values, mask = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="agg="):
        aggregate_loss(values, mask, agg="sum")
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate_loss(values, mask, agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="global_token_count"):
        aggregate_loss(values, mask, global_token_count=0)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(values, values, values, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(values, values, values, mask[:, :2])


def test_kl_penalty_hand_values():
    p = torch.tensor([-1.0, -2.0, -1.0])
    q = torch.tensor([-2.0, -1.0, -1.0])
    # (p, q) = (−1, −2): k1 = 1, k2 = 0.5, k3 = e^{−1} + 1 − 1 = 0.367879
    # (p, q) = (−2, −1): k1 = −1, k2 = 0.5, k3 = e^{1} − 1 − 1 = 0.718282
    # p = q: all 0
    torch.testing.assert_close(kl_penalty(p, q, "k1"), torch.tensor([1.0, -1.0, 0.0]), **TOL)
    torch.testing.assert_close(kl_penalty(p, q, "k2"), torch.tensor([0.5, 0.5, 0.0]), **TOL)
    torch.testing.assert_close(kl_penalty(p, q, "k3"), torch.tensor([math.exp(-1), math.e - 2, 0.0]), **TOL)
    torch.testing.assert_close(kl_penalty(p, q, "low_var_kl"), kl_penalty(p, q, "k3"), **TOL)
    # low_var_kl clamps: q − p = 15 → k3 = e^15 − 16 ≈ 3.3e6 → 10.
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([15.0]), "low_var_kl").item() == 10.0
    # Gradients flow to the policy only: d k3 / dp = 1 − e^{q−p} (0 at p = q; 1 − e^{−1} at (−1, −2)).
    p = p.requires_grad_()
    q = q.requires_grad_()
    kl_penalty(p, q, "k3").sum().backward()
    torch.testing.assert_close(p.grad, torch.tensor([1 - math.exp(-1), 1 - math.e, 0.0]), **TOL)
    assert q.grad is None
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(p, q, "k4")
