"""Per-method glue: token advantages per method and the distillation divergences against plain
torch on the full vocabulary (single process, TP=1, float64; tolerance 1e-9)."""

from __future__ import annotations

import math
import types

import pytest
import torch

from rlsd_megatron.config import load_config
from rlsd_megatron.trainer import objectives

V = 7
V_TAB = 3  # the tabular policy of the exact expected-gradient test


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



def test_distillation_is_a_mean_over_the_tokens_with_a_teacher():
    # SDPO: row 1 has no successful sibling (distill_mask 0). Official SDPO's loss mask is
    # response_mask · self_distillation_mask, so the divergence is averaged over row 0's 3 tokens
    # only: coef · Σ_row0 JSD / 3, not / 5 (all response tokens). Plain torch JSD_0.5, float64.
    student, teacher = logits_pair()
    student.requires_grad_()
    cfg = cfg_for("algorithm.method=sdpo", "algorithm.distill_loss=jsd", "algorithm.distill_coef=2.0")
    loss_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    distill_mask = loss_mask * torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    from rlsd_megatron.algorithms import loss_normalisers

    loss_fn = objectives.policy_loss_fn(cfg, loss_normalisers(loss_mask),
                                        distill_normalisers=loss_normalisers(distill_mask))
    mb = types.SimpleNamespace(targets=torch.zeros(2, 3, dtype=torch.long), fields={
        "loss_mask": loss_mask, "distill_mask": distill_mask, "teacher_logits": teacher})
    loss, _ = loss_fn(student, mb)
    p_s, p_t = student.detach().softmax(-1), teacher.softmax(-1)
    m = 0.5 * (p_s + p_t)
    jsd = 0.5 * (p_t * (p_t / m).log()).sum(-1) + 0.5 * (p_s * (p_s / m).log()).sum(-1)
    want = 2.0 * float(jsd[0].sum()) / 3  # the all-token mean would be 3/5 of this
    assert float(loss.detach()) == pytest.approx(want, rel=1e-9)


def test_sampled_sdpo_surrogate_is_a_mean_over_the_tokens_with_a_teacher():
    # SDPO with sampled distillation: its surrogate carries the distillation alone (the advantages
    # are the teacher's log-ratios, 0 on row 1, which has no successful sibling), so it is averaged
    # over row 0's 3 tokens as the divergence is. At ratio 1 (old = current log-probs) the loss is
    # -Σ_row0 A / 3, not / 5.
    student, _ = logits_pair()
    cfg = cfg_for("algorithm.method=sdpo", "algorithm.distill_loss=sampled")
    loss_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    distill_mask = loss_mask * torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    advantages = torch.tensor([[0.5, -1.5, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    from rlsd_megatron.algorithms import loss_normalisers
    from rlsd_megatron.ops import token_log_probs

    targets = torch.tensor([[1, 0, 2], [0, 1, 0]])
    old = token_log_probs(student, targets, vocab_size=student.shape[-1]).detach()
    mb = types.SimpleNamespace(targets=targets, fields={
        "loss_mask": loss_mask, "distill_mask": distill_mask, "old_logp": old, "advantages": advantages})
    loss_fn = objectives.policy_loss_fn(cfg, loss_normalisers(loss_mask), distill_normalisers=loss_normalisers(distill_mask))
    loss, _ = loss_fn(student, mb)
    assert float(loss) == pytest.approx(-(0.5 - 1.5 + 2.0) / 3, rel=1e-9)
    with pytest.raises(ValueError, match="needs distill_normalisers"):
        objectives.policy_loss_fn(cfg, loss_normalisers(loss_mask))(student, mb)
    # GRPO+OPSD's surrogate mixes the reward's advantage in: it stays over every response token.
    grpo_opsd = objectives.policy_loss_fn(cfg_for("algorithm.method=grpo_opsd", "algorithm.distill_loss=sampled"),
                                          loss_normalisers(loss_mask), distill_normalisers=loss_normalisers(distill_mask))
    assert float(grpo_opsd(student, mb)[0]) == pytest.approx(-(0.5 - 1.5 + 2.0) / 5, rel=1e-9)


def test_sampled_distillation_needs_teacher_log_probs_not_logits():
    for method in ("opsd", "sdpo", "grpo_opsd"):
        a = cfg_for(f"algorithm.method={method}", "algorithm.distill_loss=sampled").algorithm
        assert objectives.uses_teacher_log_probs(a) and not objectives.uses_distillation(a)
        assert objectives.uses_surrogate(a)  # the signal is in the advantages
        for loss in ("jsd", "topk"):
            a = cfg_for(f"algorithm.method={method}", f"algorithm.distill_loss={loss}").algorithm
            assert objectives.uses_distillation(a) and not objectives.uses_teacher_log_probs(a)
            assert objectives.uses_surrogate(a) == (method == "grpo_opsd")
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match="sampled distillation enters through token_advantages"):
        objectives.distillation_per_token(cfg_for("algorithm.distill_loss=sampled"), student, teacher,
                                          torch.zeros(2, 3, dtype=torch.long))


def test_sampled_distillation_advantage_hand_values():
    # A_t = distill_coef · (log π_T − log π_S); grpo_opsd adds it to the sequence advantage. SDPO rows
    # without a teacher (no successful sibling) get no distillation term.
    student = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    teacher = torch.tensor([[-0.5, -3.0, -9.0], [-2.0, -1.5, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    seq_adv = torch.tensor([1.0, -2.0])
    opsd_cfg = cfg_for("algorithm.method=opsd", "algorithm.distill_loss=sampled", "algorithm.distill_coef=2.0")
    opsd = objectives.token_advantages(opsd_cfg.algorithm, 1, seq_adv, mask, student, teacher)
    torch.testing.assert_close(opsd.values, torch.tensor([[1.0, -2.0, 0.0], [-2.0, -1.0, 0.0]]), rtol=0, atol=1e-6)
    # sampled KL (k1): mean of log π_S − log π_T over the 5 tokens = (−0.5 + 1 + 1 + 0.5 + 0) / 5 = 0.4
    assert opsd.metrics["distill/sampled_kl"] == pytest.approx(0.4, abs=1e-6)
    assert opsd.metrics["distill/sampled_abs_log_ratio"] == pytest.approx(0.6, abs=1e-6)  # (0.5 + 1 + 1 + 0.5 + 0) / 5
    mixed_cfg = cfg_for("algorithm.method=grpo_opsd", "algorithm.distill_loss=sampled", "algorithm.distill_coef=0.5")
    mixed = objectives.token_advantages(mixed_cfg.algorithm, 1, seq_adv, mask, student, teacher)
    torch.testing.assert_close(mixed.values, torch.tensor([[1.25, 0.5, 0.0], [-2.5, -2.25, -2.0]]), rtol=0, atol=1e-6)
    sdpo = objectives.token_advantages(cfg_for("algorithm.method=sdpo", "algorithm.distill_loss=sampled").algorithm,
                                       1, seq_adv, mask, student, teacher, teacher_mask=torch.tensor([False, True]))
    torch.testing.assert_close(sdpo.values, torch.tensor([[0.0, 0.0, 0.0], [-1.0, -0.5, 0.0]]), rtol=0, atol=1e-6)


def _exact_expected_gradient(cfg, student, teacher, temperature):
    """Σ_y P_S(y) ∇L(y) over every sequence y = (y1, y2) of the tabular student: L(y) is the
    trainer's loss (token advantages → policy_loss_fn) on that one sampled sequence. `student`
    and `teacher` are (logits at step 1 [V], logits at step 2 given y1 [V, V])."""
    first, second = student
    counts = {"global_token_count": torch.tensor(2), "global_seq_count": torch.tensor(1)}
    loss_fn = objectives.policy_loss_fn(cfg, counts, distill_normalisers=counts)  # every token has the teacher
    grads = [torch.zeros_like(first), torch.zeros_like(second)]
    mask = torch.ones(1, 2, dtype=torch.bool)
    for y1 in range(V_TAB):
        for y2 in range(V_TAB):
            targets = torch.tensor([[y1, y2]])
            logits = torch.stack([first, second[y1]])[None]  # [1, 2, V]: position t predicts y_t
            student_logp = (logits.detach() / temperature).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
            teacher_logits = torch.stack([teacher[0], teacher[1][y1]])[None]
            teacher_logp = (teacher_logits / temperature).log_softmax(-1).gather(-1, targets[..., None])[..., 0]
            adv = objectives.token_advantages(cfg.algorithm, 1, torch.zeros(1), mask, student_logp, teacher_logp)
            mb = types.SimpleNamespace(targets=targets, fields={
                "old_logp": student_logp, "advantages": adv.values, "loss_mask": mask.double(),
                "distill_mask": mask.double()})
            loss, _ = loss_fn(logits, mb)
            step_grads = torch.autograd.grad(loss, [first, second])
            prob = student_logp.sum().exp()  # P_S(y), detached: the sampling distribution
            grads = [g + prob * sg for g, sg in zip(grads, step_grads)]
    return grads



@pytest.mark.parametrize("method", ["opsd", "grpo_opsd"])
def test_sampled_distillation_expected_gradient_is_the_reverse_kl_gradient(method):
    # A 2-step policy over 3 tokens, tabular softmax: logits a [3] at step 1, b[y1] [3] at step 2;
    # the teacher likewise (c, d). Every one of the 9 sequences is enumerated, so the on-policy
    # expectation is exact. Reference (autograd of the exact objective, float64): the per-token
    # reverse KL on the student's prefixes, token-mean over the 2 tokens,
    #   coef/2 · [ KL(π_S(·) ‖ π_T(·)) + Σ_y1 sg(π_S(y1)) · KL(π_S(·|y1) ‖ π_T(·|y1)) ],
    # the objective the full-vocabulary losses (jsd at β = 1) minimise. Tolerance 1e-10 (float64).
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(V_TAB, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(V_TAB, V_TAB, generator=gen, dtype=torch.float64).requires_grad_()
    c = torch.randn(V_TAB, generator=gen, dtype=torch.float64)
    d = torch.randn(V_TAB, V_TAB, generator=gen, dtype=torch.float64)
    temperature, coef = 0.7, 1.5
    cfg = cfg_for("model.vocab_size=3", f"rollout.temperature={temperature}", f"algorithm.method={method}",
                  "algorithm.distill_loss=sampled", f"algorithm.distill_coef={coef}")
    got = _exact_expected_gradient(cfg, (a, b), (c, d), temperature)

    def kl(p_logits, q_logits):
        log_p, log_q = (p_logits / temperature).log_softmax(-1), (q_logits / temperature).log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    prefix = (a.detach() / temperature).softmax(-1)
    per_token_kl = coef / 2 * (kl(a, c) + (prefix * kl(b, d)).sum())
    want = torch.autograd.grad(per_token_kl, [a, b])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    assert want[0].abs().max() > 1e-2 and want[1].abs().max() > 1e-2  # a real gradient, not 0 = 0

    # Not the sequence-level KL's gradient: that one also credits each prefix token with the later
    # tokens' log-ratios (reward-to-go); the per-token form, like OPD's, does not.
    log_p_seq = (a / temperature).log_softmax(-1)[:, None] + (b / temperature).log_softmax(-1)
    log_q_seq = (c / temperature).log_softmax(-1)[:, None] + (d / temperature).log_softmax(-1)
    seq_kl = coef / 2 * (log_p_seq.exp() * (log_p_seq - log_q_seq)).sum()
    assert (torch.autograd.grad(seq_kl, [a])[0] - got[0]).abs().max() > 1e-3


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


def test_rlsd_options_from_the_config():
    # A = +1 and −1; Δ = ln 1.1 on token 0, −ln 1.1 on token 1 of both rows. lam_warmup_steps=4 at
    # update 2: λ = 0.5·2/4 = 0.25. Row 0 (success): w = exp(Δ) = [1.1, 1/1.1]; row 1 (failure):
    # w = exp(−Δ) = [1/1.1, 1.1]; Â = A·(0.75 + 0.25·ŵ). negative_only: row 0 keeps A = 1.
    seq_adv = torch.tensor([1.0, -1.0])
    student = torch.full((2, 2), -1.0)
    teacher = student + torch.tensor([math.log(1.1), -math.log(1.1)])
    mask = torch.ones(2, 2, dtype=torch.bool)
    m = lambda w: 0.75 + 0.25 * w  # noqa: E731
    cfg = cfg_for("algorithm.lam_warmup_steps=4").algorithm
    out = objectives.token_advantages(cfg, 2, seq_adv, mask, student, teacher)
    torch.testing.assert_close(out.values, torch.tensor([[m(1.1), m(1 / 1.1)], [-m(1 / 1.1), -m(1.1)]]),
                               rtol=0, atol=1e-6)
    assert out.metrics["rlsd/lambda"] == pytest.approx(0.25)
    # |m − 1| = 0.25·|ŵ − 1|: 0.025 and 0.25·(1 − 1/1.1) on each row.
    assert out.metrics["rlsd/reweight_abs_dev"] == pytest.approx(0.25 * (0.1 + (1 - 1 / 1.1)) / 2, abs=1e-6)
    assert out.metrics["rlsd/delta_abs_mean"] == pytest.approx(math.log(1.1), abs=1e-6)
    cfg = cfg_for("algorithm.lam_warmup_steps=4", "algorithm.negative_only=true").algorithm
    out = objectives.token_advantages(cfg, 2, seq_adv, mask, student, teacher)
    torch.testing.assert_close(out.values, torch.tensor([[1.0, 1.0], [-m(1 / 1.1), -m(1.1)]]), rtol=0, atol=1e-6)
    assert out.metrics["rlsd/reweight_abs_dev"] == pytest.approx(0.25 * (0.1 + (1 - 1 / 1.1)) / 4, abs=1e-6)


def test_distillation_only_methods_have_no_policy_gradient_advantage():
    mask = torch.ones(2, 2, dtype=torch.bool)
    for method in ("opsd", "sdpo"):
        adv = objectives.token_advantages(cfg_for(f"algorithm.method={method}").algorithm, 1, torch.ones(2), mask)
        assert adv.values.abs().sum() == 0
