"""The final-number reward (GSM8K's flexible extraction): hand-checked cases, and through the
scorer as a custom function, as examples/configs/real_model.yaml uses it."""

import pytest

from rlsd_megatron.rewards.final_number import final_number, final_number_reward


@pytest.mark.parametrize("text,number", [
    ("Tom has 3 + 4 = 7 apples now.", "7"),
    ("so she has 9 - 3 = 6 pencils left.\n\nThe answer is 6.", "6"),  # the sentence's full stop is no decimal point
    ("It costs $1,234.50 in total", "1234.50"),
    ("The temperature fell to -5 degrees", "-5"),
    ("#### 72", "72"),
    ("no digits here", None),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_reward_reads_tags_first_then_the_last_number():
    assert final_number_reward("3 + 4 = 7 apples", "7") == {"reward": 1.0, "tagged": 0.0}
    assert final_number_reward("3 + 4 = 7 apples, and 2 more bags", "7")["reward"] == 0.0  # the last number counts
    # A tagged answer wins over numbers after it; \boxed{} likewise.
    assert final_number_reward("<answer>7</answer> (checked with 3 + 4)", "7") == {"reward": 1.0, "tagged": 1.0}
    assert final_number_reward("so \\boxed{8}. Check: 3 + 4 = 7", "7") == {"reward": 0.0, "tagged": 1.0}
    assert final_number_reward("The answer is 7.0", "7")["reward"] == 1.0  # numerically equal
    assert final_number_reward("The answer is 1,000", "1000")["reward"] == 1.0
    assert final_number_reward("no number", "7")["reward"] == 0.0
    assert final_number_reward("7", "")["reward"] == 0.0  # no ground-truth number: never right


def test_as_a_custom_reward_in_the_scorer():
    from rlsd_megatron.config import RewardConfig
    from rlsd_megatron.rewards import RewardSample, RewardScorer

    samples = [RewardSample("3 + 4 = 7 apples", "7", 6), RewardSample("3 + 4 = 8", "7", 5),
               RewardSample("<answer>7</answer>", "7", 4)]
    cfg = RewardConfig(custom_fn="rlsd_megatron.rewards.final_number:final_number_reward", overlong_factor=0.0)
    with RewardScorer(cfg, num_workers=1) as scorer:
        result = scorer.score(samples)
    assert result.rewards.tolist() == [1.0, 0.0, 1.0]
    assert result.components["tagged"].tolist() == [0.0, 0.0, 1.0]
