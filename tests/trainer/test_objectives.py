"""Per-method glue: token advantages per method and the distillation divergences against plain
torch on the full vocabulary (single process, TP=1, float64; tolerance 1e-9)."""

from __future__ import annotations

import math

import pytest
import torch

from rlsd_megatron.config import load_config
from rlsd_megatron.trainer import objectives

V = 7


def cfg_for(*overrides):
    return load_config(None, ["model.vocab_size=7", "rollout.temperature=1.0", *overrides])


def logits_pair():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, V, generator=gen, dtype=torch.float64),
            torch.randn(2, 3, V, generator=gen, dtype=torch.float64))


def test_full_vocabulary_jsd_matches_the_definition():
    student, teacher = logits_pair()
    got = objectives.distillation_per_token(cfg_for("algorithm.distill_loss=jsd", "algorithm.distill_beta=0.5"),
                                            student, teacher, torch.zeros(2, 3, dtype=torch.long))
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    m = 0.5 * p_s + 0.5 * p_t
    want = 0.5 * (p_t * (p_t / m).log()).sum(-1) + 0.5 * (p_s * (p_s / m).log()).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-9)


def test_sdpo_topk_uses_the_student_support_and_a_tail_bucket():
    student, teacher = logits_pair()
    k = 3
    got = objectives.distillation_per_token(
        cfg_for("algorithm.distill_loss=topk", f"algorithm.distill_topk={k}", "algorithm.distill_support=student",
                "algorithm.distill_tail_bucket=true", "algorithm.distill_beta=0.5"),
        student, teacher, torch.zeros(2, 3, dtype=torch.long))
    ids = student.topk(k, dim=-1).indices
    def with_tail(logits):
        p = logits.softmax(-1).gather(-1, ids)
        return torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    p_s, p_t = with_tail(student), with_tail(teacher)
    m = 0.5 * (p_s + p_t)
    want = 0.5 * (p_t * (p_t / m).log()).sum(-1) + 0.5 * (p_s * (p_s / m).log()).sum(-1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-9)


def test_sampled_token_distillation_is_the_log_ratio_with_a_student_gradient():
    student, teacher = logits_pair()
    student.requires_grad_(True)
    targets = torch.tensor([[1, 2, 3], [4, 5, 6]])
    got = objectives.distillation_per_token(cfg_for("algorithm.distill_loss=sampled"), student, teacher, targets)
    want = (student.log_softmax(-1) - teacher.log_softmax(-1)).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=1e-9)
    got.sum().backward()
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["grpo", "dapo", "drgrpo", "grpo_opsd"])
def test_reward_methods_broadcast_the_sequence_advantage(method):
    seq_adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    adv = objectives.token_advantages(cfg_for(f"algorithm.method={method}").algorithm, 1, seq_adv, mask)
    assert adv.values.tolist() == [[1.5, 1.5, 0.0], [-0.5, -0.5, -0.5]]


def test_rlsd_token_advantages_and_their_metrics():
    # A = +1 on row 0: teacher likes token 0 more (Δ = ln 1.1 → w = 1.1, inside the clip), token 1 less.
    # λ at step 1 = 0.5·(1 − 1/60); Â = A·[(1−λ) + λ·ŵ].
    seq_adv = torch.tensor([1.0])
    student = torch.tensor([[-1.0, -1.0]])
    teacher = torch.tensor([[-1.0 + math.log(1.1), -1.0 - math.log(1.1)]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = objectives.token_advantages(cfg_for().algorithm, 1, seq_adv, mask, student, teacher)
    lam = 0.5 * (1 - 1 / 60)
    want = torch.tensor([[(1 - lam) + lam * 1.1, (1 - lam) + lam / 1.1]])
    torch.testing.assert_close(out.values, want, rtol=0, atol=1e-6)
    assert out.metrics["rlsd/lambda"] == pytest.approx(lam)
    assert out.metrics["rlsd/delta_success"] == pytest.approx(0.0, abs=1e-6)


def test_distillation_only_methods_have_no_policy_gradient_advantage():
    mask = torch.ones(2, 2, dtype=torch.bool)
    for method in ("opsd", "sdpo"):
        adv = objectives.token_advantages(cfg_for(f"algorithm.method={method}").algorithm, 1, torch.ones(2), mask)
        assert adv.values.abs().sum() == 0
