"""Scores a rollout batch: R = accuracy_weight·accuracy + format_weight·format + overlong (spec §1).

One :class:`RewardScorer` serves the whole run; ``score(samples)`` takes every rollout of a step
and returns rewards, the components behind them and counts of what went wrong. Which reward it
computes is decided once, from the config:

- **math** (default): accuracy from math-verify on the ``<answer>`` content (falling back to the
  last ``\\boxed{}``), run in a :class:`VerifierPool` of worker processes with
  ``reward.timeout_s`` per answer; format = 1 when the whole (tag-normalised) response is
  ``<thought>…</thought>…<answer>…</answer>`` (``reward.think_tag`` / ``reward.answer_tag``).
  A verifier timeout or error makes that sample's accuracy 0; its format and overlong terms
  still apply (they are computed here, by linear-time code).
- **reversed_addition** (``data.task``): exact match of the response token ids with the reversed
  sum and end-of-sequence, as :func:`rlsd_megatron.data.reversed_addition.exact_match_reward`;
  no tags, so R = accuracy + overlong. Computed in-process: nothing here can hang.
- **custom** (``reward.custom_fn``, wins over both): see :mod:`rlsd_megatron.rewards.custom`;
  R = the function's ``reward`` + overlong, a timeout or error scores 0.

The overlong term is :func:`rlsd_megatron.algorithms.soft_overlong_penalty` of the response
length in tokens (``reward.overlong_*``; with the recipe's max length 16,384 it never fires).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from rlsd_megatron.algorithms.rollout_corrections import soft_overlong_penalty
from rlsd_megatron.config import RewardConfig
from rlsd_megatron.rewards.custom import load_reward_fn
from rlsd_megatron.rewards.math_answer import format_score, normalize_tag_spacing
from rlsd_megatron.rewards.verifier_pool import Outcome, VerifierPool

__all__ = ["REWARD_TASKS", "RewardResult", "RewardSample", "RewardScorer"]

REWARD_TASKS = ("reversed_addition", "visual_reversed_addition")  # the visual task's answers are the text task's
_MAX_ERROR_MESSAGES = 8


@dataclass(frozen=True)
class RewardSample:
    """One rollout to score.

    ``response`` is the decoded rollout text (special tokens removed), ``ground_truth`` the
    dataset answer, ``response_length`` its length in tokens (for the overlong penalty).
    ``response_ids`` (the rollout's unpadded token ids, end-of-sequence included when sampled)
    is required by the reversed-addition task; ``question`` (raw problem text) is passed to
    custom reward functions.
    """

    response: str
    ground_truth: str
    response_length: int
    response_ids: Sequence[int] | None = None
    question: str | None = None


@dataclass
class RewardResult:
    """Rewards of a batch, ``[B]`` float32, and what they are made of.

    ``components`` maps a name (``accuracy``, ``format``, ``overlong``, or a custom function's
    keys) to ``[B]`` float32. ``counts``: ``samples``, ``timeouts``, ``errors`` (verifier
    timeouts / exceptions / dead workers, each scored 0) and ``worker_restarts`` (cumulative).
    ``errors`` holds the first few messages as ``"sample i: ..."``.
    """

    rewards: torch.Tensor
    components: dict[str, torch.Tensor]
    counts: dict[str, int]
    errors: list[str] = field(default_factory=list)

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Scalar means for logging: the reward, each component, and the counts."""
        out = {f"{prefix}mean": float(self.rewards.mean()) if self.rewards.numel() else 0.0}
        out.update({f"{prefix}{k}": float(v.mean()) if v.numel() else 0.0 for k, v in self.components.items()})
        out.update({f"{prefix}{k}": float(v) for k, v in self.counts.items()})
        return out


class RewardScorer:
    """Rewards for rollout batches, per ``RewardConfig`` (and ``data.task`` for a built-in task).

    ``num_workers`` verifier processes (default ``min(4, cpu count)``) are started at
    construction when the reward needs them (math or custom) and stopped by :meth:`close`;
    ``memory_limit_mb`` caps each one's address space. A custom function that cannot be imported
    or called as documented raises :class:`~rlsd_megatron.rewards.custom.RewardFunctionError`
    here, before training starts.
    """

    def __init__(self, cfg: RewardConfig, *, task: str | None = None, num_workers: int | None = None,
                 memory_limit_mb: int | None = 2048) -> None:
        self.cfg = cfg
        if task is not None and task not in REWARD_TASKS:
            raise ValueError(f"data.task={task!r} has no built-in reward; known tasks: {list(REWARD_TASKS)}.")
        # The visual task's answers and reward are the text task's (data/visual_addition.py).
        self.kind = "custom" if cfg.custom_fn else ("reversed_addition" if task == "visual_reversed_addition"
                                                    else task or "math")
        # Check the penalty's settings now rather than at the first step.
        soft_overlong_penalty(torch.zeros(1), max_length=cfg.overlong_max_length, buffer=cfg.overlong_buffer,
                              factor=cfg.overlong_factor)
        self._pool: VerifierPool | None = None
        warmup = None
        if self.kind == "custom":
            load_reward_fn(cfg.custom_fn)
            fn_path = "rlsd_megatron.rewards.custom:call_reward_fn"
        elif self.kind == "math":
            fn_path = "rlsd_megatron.rewards.math_answer:math_accuracy"
            warmup = (["<answer>0.5</answer>", "\\frac{1}{2}"], {})
        if self.kind in ("custom", "math"):
            workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
            self._pool = VerifierPool(fn_path, num_workers=workers, timeout_s=cfg.timeout_s,
                                      memory_limit_mb=memory_limit_mb, warmup=warmup)

    def close(self) -> None:
        """Stop the verifier workers (idempotent)."""
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, samples: Sequence[RewardSample]) -> RewardResult:
        """Rewards and components of every sample; see the module docstring for the kinds."""
        lengths = torch.tensor([s.response_length for s in samples], dtype=torch.float32)
        overlong = soft_overlong_penalty(lengths, max_length=self.cfg.overlong_max_length,
                                         buffer=self.cfg.overlong_buffer, factor=self.cfg.overlong_factor)
        errors: list[str] = []
        timeouts = failures = 0
        if self.kind == "reversed_addition":
            components = {"accuracy": _exact_match(samples)}
            rewards = components["accuracy"] + overlong
        else:
            texts = [normalize_tag_spacing(s.response) if self.kind == "math" else s.response for s in samples]
            outcomes = self._pool.map([self._pool_item(s, text) for s, text in zip(samples, texts)])
            for i, outcome in enumerate(outcomes):
                if outcome.status != "ok":
                    timeouts += outcome.status == "timeout"
                    failures += outcome.status == "error"
                    if len(errors) < _MAX_ERROR_MESSAGES:
                        errors.append(f"sample {i}: {outcome.status}: {outcome.message}")
            if self.kind == "math":
                components = self._math_components(texts, outcomes)
                rewards = (self.cfg.accuracy_weight * components["accuracy"]
                           + self.cfg.format_weight * components["format"] + overlong)
            else:
                components = _custom_components(outcomes)
                rewards = components["reward"] + overlong
        components["overlong"] = overlong
        counts = {"samples": len(samples), "timeouts": timeouts, "errors": failures,
                  "worker_restarts": self._pool.restarts if self._pool is not None else 0}
        return RewardResult(rewards.float(), components, counts, errors)

    def _pool_item(self, sample: RewardSample, text: str) -> tuple[list, dict]:
        if self.kind == "math":
            return [text, str(sample.ground_truth), self.cfg.answer_tag], {}
        info = {"question": sample.question, "response_length": int(sample.response_length)}
        return [self.cfg.custom_fn, text, str(sample.ground_truth), info], {}

    def _math_components(self, texts: Sequence[str], outcomes: list[Outcome]) -> dict[str, torch.Tensor]:
        """``texts``: the tag-normalised responses (the recipe checks format after normalising)."""
        accuracy = [float(o.value) if o.status == "ok" else 0.0 for o in outcomes]
        fmt = [format_score(text, think_tag=self.cfg.think_tag, answer_tag=self.cfg.answer_tag) for text in texts]
        return {"accuracy": torch.tensor(accuracy, dtype=torch.float32),
                "format": torch.tensor(fmt, dtype=torch.float32)}


def _custom_components(outcomes: list[Outcome]) -> dict[str, torch.Tensor]:
    names = ["reward"] + sorted({k for o in outcomes if o.status == "ok" for k in o.value} - {"reward"})
    return {name: torch.tensor([o.value.get(name, 0.0) if o.status == "ok" else 0.0 for o in outcomes],
                               dtype=torch.float32) for name in names}


def _exact_match(samples: Sequence[RewardSample]) -> torch.Tensor:
    from rlsd_megatron.data.reversed_addition import CharTokenizer, exact_match_reward

    tokenizer = CharTokenizer()
    scores = []
    for i, sample in enumerate(samples):
        if sample.response_ids is None:
            raise ValueError(f"sample {i}: the reversed_addition reward needs RewardSample.response_ids "
                             "(it compares token ids, end-of-sequence included).")
        scores.append(exact_match_reward(tokenizer, sample.ground_truth, [int(t) for t in sample.response_ids]))
    return torch.tensor(scores, dtype=torch.float32)
