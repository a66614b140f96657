"""One-step-off-policy rollouts (`train.off_policy_steps=1`, engines on their own ranks).

Step n receives the batch submitted during step n-1, then submits step n+1's prompts before it
scores and trains, so the engine ranks generate them while the learner trains step n. The engine
takes requests in order, so that batch is sampled with the weights of before step n's update
(version n-1, synced at the end of step n-1), and step n+1 trains on it with the learner at version
n: one update stale, never more (`rollout/staleness`). The first step has nothing to overlap with
and submits its own batch; the last submits none.

The ratio's denominator is then the behaviour policy, the engine's log-probs of the sampled tokens
(`old_log_probs`), unless TIS (`algorithm.tis_cap`) is on: then the ratio stays against the
learner's recomputed log-probs and the truncated weight π_learner/π_engine corrects for the
behaviour policy (decoupled PPO), as in the synchronous path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlsd_megatron.data.prompts import PromptDataset, PromptRow
from rlsd_megatron.rollout.engine import SamplingParams
from rlsd_megatron.trainer.rollouts import Rollouts, prompt_images, score_generations, share_over


@dataclass(frozen=True)
class Draw:
    """One batch of a replica's prompts and how to sample it (what a request carries)."""

    rows: list[PromptRow]
    sampling: SamplingParams
    prompt_offset: int


class OneStepOffPolicy:
    """The batch in flight between steps (see the module docstring). `engine` is the replica
    host's `RemoteEngine` (None on its other ranks, which receive the host's rollouts over `group`)."""

    def __init__(self, draw: Callable[[], Draw], engine, dataset: PromptDataset, scorer, group):
        self.draw, self.engine, self.dataset, self.scorer, self.group = draw, engine, dataset, scorer, group
        self.in_flight: Draw | None = None

    def next_batch(self, *, submit_next: bool) -> Rollouts:
        """This step's rollouts; then, with `submit_next`, the next step's prompts are submitted."""
        if self.in_flight is None:  # the first step: nothing was submitted for it
            self._submit()
        rollouts = self._receive()
        if submit_next:
            self._submit()
        return rollouts

    def _submit(self) -> None:
        draw = self.draw()
        if self.engine is not None:
            self.engine.submit([row.prompt_ids for row in draw.rows], draw.sampling, prompt_offset=draw.prompt_offset,
                               images=prompt_images(draw.rows))
        self.in_flight = draw

    def _receive(self) -> Rollouts:
        draw, self.in_flight = self.in_flight, None
        payload = None
        if self.engine is not None:
            payload = score_generations(draw.rows, self.dataset, self.engine.receive(), draw.sampling.n, self.scorer)
            payload.engine_metrics = self.engine.last_batch_metrics()
        return share_over(payload, self.group)


def old_log_probs(rollouts: Rollouts, student: list[torch.Tensor], *, off_policy: bool,
                  tis: bool) -> list[torch.Tensor]:
    """The ratio's "old" log-probs per student sequence (aligned with its tokens): the learner's
    recomputed ones (`student`), or off-policy without TIS the engine's (the behaviour policy's)."""
    if not off_policy or tis:
        return student
    return rollouts.on_sequences([torch.tensor(lp, dtype=torch.float32) for lp in rollouts.engine_log_probs])


def staleness(rollouts: Rollouts, learner_version: int) -> dict[str, float]:
    """`rollout/staleness`: updates between the weights that sampled the batch and the learner's."""
    if rollouts.behaviour_version is None:
        return {}
    return {"rollout/staleness": float(learner_version - rollouts.behaviour_version)}
