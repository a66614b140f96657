"""RewardScorer end to end: real math-verify in worker processes, the reward recipe, the task's
exact match, custom functions by dotted path (including ones that hang, crash or lie)."""

import random
import time

import pytest
import torch

from rlsd_megatron.config import RewardConfig
from rlsd_megatron.data import reversed_addition as task
from rlsd_megatron.rewards import RewardFunctionError, RewardSample, RewardScorer, load_reward_fn
from rlsd_megatron.rewards.custom import call_reward_fn

FNS = "tests.rewards.reward_fns"
GOOD = "<thought>work</thought><answer>{}</answer>"


@pytest.fixture(scope="module")
def math_scorer():
    # Overlong window 32..64 tokens so the penalty is visible (the recipe's 16,384 never fires).
    cfg = RewardConfig(timeout_s=5.0, overlong_max_length=64, overlong_buffer=32, overlong_factor=0.1)
    with RewardScorer(cfg, num_workers=2) as scorer:
        yield scorer


def test_recipe_reward_with_real_math_verify(math_scorer):
    samples = [
        RewardSample(GOOD.format("0.5"), "\\frac{1}{2}", 10),  # right, formatted
        RewardSample(GOOD.format("x=2"), "2", 10),  # right, formatted
        RewardSample("so \\boxed{2}", "2", 10),  # right, unformatted (boxed fallback)
        RewardSample(GOOD.format("3"), "4", 10),  # wrong, formatted
        RewardSample("the answer is 4", "4", 10),  # no answer given
        RewardSample("< thought >w</ thought >\n< answer > 7 </answer>", "7", 48),  # spacing normalised; overlong
        RewardSample(GOOD.format("1"), "1", 100),  # past max length
    ]
    result = math_scorer.score(samples)
    accuracy = torch.tensor([1, 1, 1, 0, 0, 1, 1], dtype=torch.float32)
    fmt = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.float32)
    overlong = torch.tensor([0, 0, 0, 0, 0, 0.1 * (32 - 48) / 32, -0.1])
    torch.testing.assert_close(result.components["accuracy"], accuracy)
    torch.testing.assert_close(result.components["format"], fmt)
    torch.testing.assert_close(result.components["overlong"], overlong)
    torch.testing.assert_close(result.rewards, 0.9 * accuracy + 0.1 * fmt + overlong)
    assert result.counts == {"samples": 7, "timeouts": 0, "errors": 0, "worker_restarts": 0}
    metrics = result.metrics()
    assert metrics["reward/accuracy"] == pytest.approx(5 / 7) and metrics["reward/timeouts"] == 0


def test_hanging_verifier_scores_zero_and_is_replaced(math_scorer):
    # sympy evaluates this tower for minutes: the worker is killed at the time limit.
    samples = [RewardSample(GOOD.format("9^{9^{9^{9}}}"), "1", 5), RewardSample(GOOD.format("4"), "4", 5)]
    start = time.monotonic()
    result = math_scorer.score(samples)
    assert time.monotonic() - start < 20
    assert result.counts["timeouts"] == 1 and result.counts["errors"] == 0
    assert result.errors == ["sample 0: timeout: no result within 5 s"]
    # Accuracy 0 for the timeout; its format still counts. The other sample is unaffected.
    torch.testing.assert_close(result.rewards, torch.tensor([0.1, 1.0]))
    assert math_scorer.score(samples[1:]).rewards.tolist() == [pytest.approx(1.0)]  # the step goes on
    assert result.counts["worker_restarts"] >= 1


def test_default_overlong_never_fires():
    cfg = RewardConfig()
    scorer = RewardScorer(cfg, task="reversed_addition")
    result = scorer.score([RewardSample("", "0000", 4096, response_ids=[1])])
    assert result.components["overlong"].tolist() == [0.0]


def test_exact_match_task_equals_task_reward():
    tokenizer = task.CharTokenizer()
    rng = random.Random(0)
    samples, expected = [], []
    for problem in task.sample_problems(60, seed=5):
        response = task.answer_ids(tokenizer, problem.answer)
        choice = rng.randrange(3)
        if choice == 1:
            response = response[:-1]  # no end-of-sequence
        elif choice == 2:
            response = [tokenizer.ids[str((int(problem.answer[0]) + 1) % 10)], *response[1:]]
        samples.append(RewardSample(tokenizer.decode(response), problem.answer, len(response), response_ids=response))
        expected.append(task.exact_match_reward(tokenizer, problem.answer, response))
        assert expected[-1] == float(choice == 0)  # only the untouched answer matches
    cfg = RewardConfig(overlong_max_length=8, overlong_buffer=4, overlong_factor=0.5)
    with RewardScorer(cfg, task="reversed_addition") as scorer:
        result = scorer.score(samples)
    assert result.components["accuracy"].tolist() == expected
    assert 0 < sum(expected) < len(expected)
    lengths = torch.tensor([s.response_length for s in samples], dtype=torch.float32)
    penalty = torch.where(lengths > 4, 0.5 * (4 - lengths) / 4, torch.zeros_like(lengths))  # DAPO eq. 13
    torch.testing.assert_close(result.rewards, torch.tensor(expected) + penalty)
    with pytest.raises(ValueError, match="needs RewardSample.response_ids"):
        scorer.score([RewardSample("9750", "9750", 5)])
    with pytest.raises(ValueError, match="data.task='sudoku' has no built-in reward"):
        RewardScorer(cfg, task="sudoku")


def test_custom_function_calling_convention():
    info = {"question": "q", "response_length": 3}
    assert call_reward_fn(f"{FNS}:length_bonus", " 7 ", "7", info) == {"reward": 1.0}
    assert call_reward_fn(f"{FNS}:takes_everything", "a", "b", info) == {"reward": 0.5}
    assert call_reward_fn(f"{FNS}:with_components", "a", "a", info) == {"reward": 1.0, "length": 3.0, "has_q": 1.0}


def test_custom_components_end_to_end():
    cfg = RewardConfig(custom_fn=f"{FNS}:with_components", overlong_max_length=8, overlong_buffer=4)
    with RewardScorer(cfg, num_workers=1) as scorer:
        result = scorer.score([RewardSample("a", "a", 2, question="q"), RewardSample("a", "b", 6)])
    assert sorted(result.components) == ["has_q", "length", "overlong", "reward"]
    assert result.components["length"].tolist() == [2.0, 6.0]
    assert result.components["has_q"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(result.rewards, torch.tensor([1.0, 0.1 * (4 - 6) / 4]))


def test_misbehaving_custom_function_is_contained():
    cfg = RewardConfig(custom_fn=f"{FNS}:misbehaving", timeout_s=1.0, overlong_factor=0.0)
    kinds = ["ok", "hang", "spin", "raise", "die", "nan", "text", "ok"]
    start = time.monotonic()
    with RewardScorer(cfg, num_workers=2) as scorer:
        result = scorer.score([RewardSample(kind, "", 1) for kind in kinds])
        assert scorer.score([RewardSample("ok", "", 1)]).rewards.tolist() == [1.0]  # the next step runs
    assert time.monotonic() - start < 30
    assert result.rewards.tolist() == [1.0, 0, 0, 0, 0, 0, 0, 1.0]
    assert result.counts["timeouts"] == 2 and result.counts["errors"] == 4
    assert result.counts["worker_restarts"] == 3  # two killed for time, one died
    messages = "\n".join(result.errors)
    assert "sample 3: error: RuntimeError: reward function exploded" in messages
    assert "sample 4: error: worker process died (exit code 3)" in messages
    assert "sample 5: error: ValueError: returned reward=nan; rewards must be finite numbers." in messages
    assert "sample 6: error: ValueError: returned reward='1.0'" in messages


@pytest.mark.parametrize("path, message", [
    ("tests.rewards.reward_fns.length_bonus",
     "reward.custom_fn='tests.rewards.reward_fns.length_bonus' must look like 'package.module:function'"),
    ("tests.rewards.no_such_module:f",
     "reward.custom_fn='tests.rewards.no_such_module:f': cannot import module 'tests.rewards.no_such_module' "
     "(ModuleNotFoundError: No module named 'tests.rewards.no_such_module'); is its directory on PYTHONPATH"),
    (f"{FNS}:nope", f"reward.custom_fn='{FNS}:nope': '{FNS}' has no attribute 'nope'; names it defines include"),
    (f"{FNS}:NOT_CALLABLE", f"reward.custom_fn='{FNS}:NOT_CALLABLE' is a int, not a function"),
    (f"{FNS}:one_argument", f"reward.custom_fn='{FNS}:one_argument' has signature (response), which cannot be "
                            "called as fn(response, ground_truth)"),
    (f"{FNS}:coroutine", f"reward.custom_fn='{FNS}:coroutine' is an async function"),
])
def test_dotted_path_errors(path, message):
    with pytest.raises(RewardFunctionError) as excinfo:
        load_reward_fn(path)
    assert message in str(excinfo.value)


def test_bad_custom_function_fails_at_construction():
    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match="has no attribute 'nope'"):
        RewardScorer(RewardConfig(custom_fn=f"{FNS}:nope"))
    assert time.monotonic() - start < 5  # no worker was started


def test_bad_overlong_settings_fail_at_construction():
    with pytest.raises(ValueError, match="buffer=3072 must be in"):
        RewardScorer(RewardConfig(overlong_max_length=1024), task="reversed_addition")
