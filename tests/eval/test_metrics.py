"""Benchmark metrics against hand-computed values and, for pass@k, against exact binomials."""

from fractions import Fraction
from math import comb

import pytest

from rlsd_megatron.eval.metrics import ProblemSamples, benchmark_metrics, majority_answer, pass_at_k


def problem(scores, answers, lengths=None, truncated=None):
    n = len(scores)
    return ProblemSamples(scores, answers, lengths or [1] * n, truncated or [False] * n)


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)   # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)   # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0                  # only one wrong sample: any 2 include a right one
    assert pass_at_k(4, 1, 4) == 1.0


def test_pass_at_k_equals_the_exact_binomial_form_where_it_would_overflow_a_float():
    # C(1000, 500) ~ 1e299 and C(1200, 600) overflows a float; the product form needs neither.
    for n, c, k in [(16, 5, 3), (64, 1, 8), (1000, 10, 500), (1200, 3, 600), (1200, 0, 1)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n=4, c=5, k=1"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(4, 1, 0)


def test_majority_ties_go_to_the_answer_given_first_and_none_does_not_vote():
    assert majority_answer(["4", "3", None, "3", "4"]) == 0        # 2-2 tie: "4" came first
    assert majority_answer([None, "3", "4", "4", None, None]) == 2  # three Nones do not win
    assert majority_answer([None, None]) is None


def test_benchmark_metrics_hand_computed():
    # n = 4, three problems.
    problems = [
        # a 2-2 tie of "7" and "8": "7" came first, and is right
        problem([1, 0, 0, 1], ["7", "8", "8", "7"], [3, 5, 4, 4], [False, True, False, False]),
        problem([0, 0, 1, 0], ["2", "2", "5", None], [10, 10, 2, 2], [True, True, False, False]),  # majority "2", wrong
        problem([0, 0, 0, 0], [None, None, None, None], [1, 1, 1, 1]),                            # nobody answered
    ]
    m = benchmark_metrics(problems, ks=[1, 2, 4])
    assert m["avg@4"] == pytest.approx(3 / 12)
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    # pass@2: problem 1: 1 - C(2,2)/C(4,2) = 5/6; problem 2: 1 - C(3,2)/C(4,2) = 1/2; problem 3: 0.
    assert m["pass@2"] == pytest.approx((5 / 6 + 1 / 2) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(1 / 3)
    assert m["mean_response_tokens"] == pytest.approx((16 + 24 + 4) / 12)
    assert m["truncation_rate"] == pytest.approx(3 / 12)
    assert (m["problems"], m["samples"]) == (3, 12)


def test_benchmark_metrics_refuses_mixed_n_and_k_above_n():
    with pytest.raises(ValueError, match=r"same number of samples n; found n in \[1, 2\]"):
        benchmark_metrics([problem([1], ["1"]), problem([1, 0], ["1", "2"])])
    with pytest.raises(ValueError, match="k=\\[8\\]"):
        benchmark_metrics([problem([1, 0], ["1", "2"])], ks=[1, 8])
    with pytest.raises(ValueError, match="0.0 or 1.0"):
        problem([0.5], ["1"])
    with pytest.raises(ValueError, match="one common length"):
        ProblemSamples([1, 0], ["1"], [1, 1], [False, False])
