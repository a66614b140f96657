"""Rewards for rollouts: math answers (math-verify, format, overlong), the built-in task's exact
match, and user functions by dotted path, behind one batched :class:`RewardScorer`.

Exports are resolved lazily: the verifier worker processes import
``rlsd_megatron.rewards.verifier_pool`` / ``math_answer`` and must not pay for torch, which the
scorer needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "RewardResult": "scorer",
    "RewardSample": "scorer",
    "RewardScorer": "scorer",
    "REWARD_TASKS": "scorer",
    "RewardFunctionError": "custom",
    "load_reward_fn": "custom",
    "Outcome": "verifier_pool",
    "VerifierPool": "verifier_pool",
    "VerifierPoolError": "verifier_pool",
    "extract_answer": "math_answer",
    "format_score": "math_answer",
    "last_boxed": "math_answer",
    "math_accuracy": "math_answer",
    "normalize_tag_spacing": "math_answer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from rlsd_megatron.rewards.custom import RewardFunctionError, load_reward_fn
    from rlsd_megatron.rewards.math_answer import (extract_answer, format_score, last_boxed, math_accuracy,
                                                   normalize_tag_spacing)
    from rlsd_megatron.rewards.scorer import REWARD_TASKS, RewardResult, RewardSample, RewardScorer
    from rlsd_megatron.rewards.verifier_pool import Outcome, VerifierPool, VerifierPoolError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlsd_megatron.rewards' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rlsd_megatron.rewards.{_EXPORTS[name]}"), name)
