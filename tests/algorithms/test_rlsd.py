"""RLSD's λ schedule and token advantages: hand-computed values from the spec, and their properties."""

import pytest
import torch

from rlsd_megatron.algorithms import (
    group_advantages,
    policy_loss,
    rlsd_lambda,
    rlsd_token_advantages,
    rlsd_token_weights,
)

TOL = dict(rtol=0, atol=1e-6)  # float32 arithmetic on O(1) values


def test_rlsd_lambda_schedule():
    # λ_s = 0.5·max(0, 1 − s/60): s=1 → 0.5·59/60 = 0.4916667; s=30 → 0.25; s ≥ 60 → 0.
    assert rlsd_lambda(1) == pytest.approx(0.5 * 59 / 60, abs=1e-12)
    assert rlsd_lambda(30) == pytest.approx(0.25, abs=1e-12)
    assert rlsd_lambda(60) == 0.0 and rlsd_lambda(61) == 0.0
    assert rlsd_lambda(10, lam0=0.3, decay_steps=20) == pytest.approx(0.15, abs=1e-12)
    assert rlsd_lambda(1000, decay_steps=None) == 0.5 and rlsd_lambda(1000, decay_steps=0) == 0.5
    with pytest.raises(ValueError):
        rlsd_lambda(1, lam0=1.5)


def test_rlsd_lambda_warmup_then_decay_counted_from_the_warmup():
    # The authors' schedule, W = 10, D = 60, λ0 = 0.5: λ = 0.5·s/10 for s < 10, then
    # 0.5·max(0, 1 − (s − 10)/60): s=1 → 0.05, s=5 → 0.25, s=10 → 0.5 (peak, no plateau),
    # s=40 → 0.5·(1 − 30/60) = 0.25, s=69 → 0.5/60, s=70 → 0.
    schedule = dict(lam0=0.5, decay_steps=60, warmup_steps=10)
    for step, want in ((0, 0.0), (1, 0.05), (5, 0.25), (10, 0.5), (11, 0.5 * 59 / 60), (40, 0.25),
                       (69, 0.5 / 60), (70, 0.0), (500, 0.0)):
        assert rlsd_lambda(step, **schedule) == pytest.approx(want, abs=1e-12), step
    # No decay: the warm-up, then λ0 for good.
    assert rlsd_lambda(5, lam0=0.4, decay_steps=None, warmup_steps=20) == pytest.approx(0.1, abs=1e-12)
    assert rlsd_lambda(1000, lam0=0.4, decay_steps=None, warmup_steps=20) == 0.4
    # warmup_steps = 0 is the spec's schedule exactly.
    assert all(rlsd_lambda(s, warmup_steps=0) == rlsd_lambda(s) for s in range(70))
    with pytest.raises(ValueError, match="warmup_steps=-1 is negative"):
        rlsd_lambda(1, warmup_steps=-1)


def _hand_case():
    # seq A = [2, −1, 0]; Δ per token (teacher − student), the last token of row 1 is padding.
    seq_adv = torch.tensor([2.0, -1.0, 0.0])
    delta = torch.tensor([[0.1, -0.1, 0.5], [0.1, -0.5, 0.0], [0.3, -0.3, 0.0]])
    student = torch.full((3, 3), -1.0)
    teacher = student + delta
    teacher[1, 2] = -torch.inf  # garbage on a masked position must not leak
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return seq_adv, teacher, student, mask


def test_rlsd_token_advantages_hand_values():
    seq_adv, teacher, student, mask = _hand_case()
    # Row 0, A = 2 > 0: w = exp(Δ) = [1.105171, 0.904837, 1.648721] → ŵ = [1.105171, 0.904837, 1.2];
    #   λ = 0.5: Â = 2·(0.5 + 0.5·ŵ) = 1 + ŵ = [2.105171, 1.904837, 2.2].
    # Row 1, A = −1: w = exp(−Δ) = [0.904837, 1.648721] → ŵ = [0.904837, 1.2];
    #   Â = −(0.5 + 0.5·ŵ) = [−0.952419, −1.1], padding → 0.
    # Row 2, A = 0: Â = 0.
    expected = torch.tensor([[2.105171, 1.904837, 2.2], [-0.952419, -1.1, 0.0], [0.0, 0.0, 0.0]])
    out = rlsd_token_advantages(seq_adv, teacher, student, mask, lam=0.5)
    torch.testing.assert_close(out, expected, **TOL)

    w = rlsd_token_weights(seq_adv, teacher, student, mask)
    torch.testing.assert_close(w.clipped[0], torch.tensor([1.105171, 0.904837, 1.2]), **TOL)
    torch.testing.assert_close(w.weight[0, 2], torch.tensor(1.648721), **TOL)
    assert w.delta[1, 2] == 0 and w.clipped[1, 2] == 1  # masked: neutral
    assert torch.equal(w.clipped[2], torch.ones(3))  # sign(0) = 0 → w = 1
    assert torch.isfinite(w.delta).all() and torch.isfinite(out).all()


def test_rlsd_negative_only_reweights_failed_rollouts_only():
    # Same case as above with negative_only: row 0 (A = 2 > 0) keeps GRPO's A on every token,
    # row 1 (A = −1) is reweighted as before, row 2 (A = 0) stays 0.
    seq_adv, teacher, student, mask = _hand_case()
    expected = torch.tensor([[2.0, 2.0, 2.0], [-0.952419, -1.1, 0.0], [0.0, 0.0, 0.0]])
    out = rlsd_token_advantages(seq_adv, teacher, student, mask, lam=0.5, negative_only=True)
    torch.testing.assert_close(out, expected, **TOL)


def test_rlsd_token_advantages_are_detached():
    seq_adv, teacher, student, mask = _hand_case()
    out = rlsd_token_advantages(seq_adv.requires_grad_(), teacher.requires_grad_(), student.requires_grad_(),
                                mask, lam=0.5)
    assert not out.requires_grad


def _random_case(seed: int, batch: int = 16, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    seq_adv = torch.randn(batch, generator=g)
    seq_adv[::5] = 0.0
    student = -torch.rand(batch, length, generator=g) * 5
    teacher = student + torch.randn(batch, length, generator=g) * 2  # large Δ: clipping is exercised
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return seq_adv, teacher, student, mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_rlsd_sign_and_bounds(seed, lam):
    seq_adv, teacher, student, mask = _random_case(seed)
    eps = 0.2
    out = rlsd_token_advantages(seq_adv, teacher, student, mask, lam=lam, clip_eps=eps)
    a = seq_adv[:, None].expand_as(out)
    assert torch.equal(torch.sign(out)[mask], torch.sign(a)[mask])  # direction is the verifier's
    assert (out[~mask] == 0).all()
    mag, base = out.abs()[mask], a.abs()[mask]
    slack = 1e-6 * base  # float32 rounding of (1 − λ) + λ·ŵ
    assert (mag >= base * (1 - lam * eps) - slack).all()
    assert (mag <= base * (1 + lam * eps) + slack).all()


@pytest.mark.parametrize("seed", range(3))
def test_lambda_zero_is_exactly_grpo(seed):
    seq_adv, teacher, student, mask = _random_case(seed)
    out = rlsd_token_advantages(seq_adv, teacher, student, mask, lam=0.0)
    grpo = torch.where(mask, seq_adv[:, None].expand_as(mask), torch.zeros(()))
    assert torch.equal(out, grpo)


def test_all_equal_group_gives_zero_advantage_and_zero_gradient():
    # Two groups of 4: group 0 mixed, group 1 all 0.1 (format-only reward).
    rewards = torch.tensor([1.0, 0.1, 0.1, 1.0, 0.1, 0.1, 0.1, 0.1])
    seq_adv = group_advantages(rewards, 4)
    _, teacher, student, mask = _random_case(0, batch=8)
    adv = rlsd_token_advantages(seq_adv, teacher, student, mask, lam=0.5)
    assert torch.equal(adv[4:], torch.zeros_like(adv[4:]))
    logp = (student + 0.05).requires_grad_()
    loss, _ = policy_loss(logp, student, adv, mask)
    loss.backward()
    assert torch.equal(logp.grad[4:], torch.zeros_like(logp.grad[4:]))
    assert logp.grad[:4][mask[:4]].abs().sum() > 0


def test_shape_errors_are_explicit():
    seq_adv, teacher, student, mask = _hand_case()
    with pytest.raises(ValueError, match=r"\[B\]"):
        rlsd_token_advantages(seq_adv[:2], teacher, student, mask, lam=0.5)
    with pytest.raises(ValueError, match="mask"):
        rlsd_token_advantages(seq_adv, teacher, student, mask[:, :2], lam=0.5)
    with pytest.raises(ValueError, match="lam"):
        rlsd_token_advantages(seq_adv, teacher, student, mask, lam=2.0)
