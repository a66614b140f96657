"""Reward functions for trainer tests: graded so that a random policy's groups differ."""


def digit_fraction(response: str, ground_truth: str) -> float:
    """Share of the response's characters that are digits of the ground truth."""
    if not response:
        return 0.0
    return sum(ch in ground_truth for ch in response) / len(response)


def vowel_fraction(response: str, ground_truth: str) -> float:
    """Share of the response's characters that are vowels: varies between the samples of a random
    policy over a word-piece vocabulary, where digits are rare."""
    if not response:
        return 0.0
    return sum(ch in "aeiouAEIOU" for ch in response) / len(response)
