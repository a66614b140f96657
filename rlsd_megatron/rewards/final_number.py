"""GSM8K-style answer checking for models that do not write the recipe's tags.

The math reward (``math_answer``) scores only an ``<answer>…</answer>`` or ``\\boxed{}`` answer,
which is right for models trained on the recipe's format. A small instruct model answers in prose
("so he has 3 + 4 = 7 apples now."), and with no answer tag every rollout scores 0 and a group
has no signal. GSM8K's usual "flexible" extraction reads the last number of the response instead.

Use it as a custom reward: ``reward.custom_fn=rlsd_megatron.rewards.final_number:final_number_reward``
(it runs in the verifier pool like any custom function). Plain text handling, linear time, no
parsing of expressions; imports nothing heavy.
"""

from __future__ import annotations

import re
from fractions import Fraction

from rlsd_megatron.rewards.math_answer import extract_answer

__all__ = ["final_number", "final_number_reward"]

# An optional sign, digits with optional thousands separators, an optional decimal part.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in ``text`` (thousands separators removed, a trailing ``.0…`` kept), or None."""
    found = None
    for found in _NUMBER.finditer(text):
        pass
    return found.group(0).replace(",", "") if found else None


def _same_number(a: str, b: str) -> bool:
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return False


def final_number_reward(response: str, ground_truth: str) -> dict[str, float]:
    """1.0 when the response's answer equals the number ``ground_truth``, else 0.0.

    The answer is the ``<answer>`` / ``\\boxed{}`` content when the response has one
    (``math_answer.extract_answer``), else the whole response; its last number is compared with
    the ground truth's last number as exact fractions (so ``7``, ``7.0`` and ``7.00`` agree).
    Components: ``reward``, ``tagged`` (1 when the answer came from a tag or box).
    """
    tagged = extract_answer(response)
    answer = final_number(tagged or response)
    gold = final_number(ground_truth)
    correct = answer is not None and gold is not None and _same_number(answer, gold)
    return {"reward": float(correct), "tagged": float(bool(tagged))}
