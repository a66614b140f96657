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

Exact resume. A checkpoint after step k must say what step k+1 trains on: the batch generated with
the weights of version k-1 while step k trained. It holds that batch itself (prompts' dataset
indices, response tokens, the engine's log-probs, rewards: `state_dict`), not a recipe to make it
again: regenerating would need the weights of version k-1, a second copy of the model in every
checkpoint, and an engine that reproduces its samples bit for bit (SGLang does only in its slower
deterministic mode), while the batch is a few tokens and floats per response. Saving first takes
the batch in flight (`settle`: the learner waits for the rest of its generation, which the next
step would have waited for anyway). A step abandoned for a stop after its generation puts its
batch back (`put_back`) before it is saved, and submits the next one only once it goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
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
    """The batch between steps (see the module docstring): in flight on the engine, or received
    early. `engine` is the replica host's `RemoteEngine` (None on its other ranks, which receive the
    host's rollouts over `group`)."""

    def __init__(self, draw: Callable[[], Draw], engine, dataset: PromptDataset, scorer, group):
        self.draw, self.engine, self.dataset, self.scorer, self.group = draw, engine, dataset, scorer, group
        self.in_flight: Draw | None = None  # submitted, its generations not received yet
        self.received: Rollouts | None = None  # received before its step (a save, an abandoned step)

    @property
    def pending(self) -> bool:
        """The next step's batch was drawn in an earlier step (it is in flight or received)."""
        return self.in_flight is not None or self.received is not None

    def next_batch(self) -> Rollouts:
        """This step's rollouts (drawn and generated now on the first step, which has none pending)."""
        if self.received is not None:
            rollouts, self.received = self.received, None
            return rollouts
        if self.in_flight is None:
            self.submit_next()
        return self._receive()

    def put_back(self, rollouts: Rollouts) -> None:
        """A step abandoned after `next_batch` returns its batch: the step after the resume trains on it."""
        self.received = rollouts

    def settle(self) -> None:
        """Receive the batch in flight (collective over the replica), so that a checkpoint can hold it."""
        if self.in_flight is not None:
            self.received = self._receive()

    def state_dict(self) -> dict | None:
        """The received batch as plain data, on the replica's host rank (None on its other ranks and
        when none is received). Call `settle()` first."""
        if self.in_flight is not None:
            raise RuntimeError("OneStepOffPolicy.state_dict() with a batch in flight: settle() it first")
        batch = self.received
        if batch is None or self.engine is None:
            return None
        # Every field (the routed experts of routing replay too), the prompt rows by their index.
        state = {f.name: getattr(batch, f.name) for f in fields(batch) if f.name != "rows"}
        return {**state, "rows": [row.index for row in batch.rows]}

    def load_state_dict(self, state: dict | None, *, pending: bool) -> None:
        """Restore what `state_dict` returned on the host; with `pending` (every rank's flag) the host
        shares it over the replica (collective)."""
        self.in_flight, self.received = None, None
        if not pending:
            return
        batch = None
        if state is not None:
            batch = Rollouts(**{**state, "rows": [self.dataset[i] for i in state["rows"]]})
        self.received = share_over(batch, self.group)

    def submit_next(self) -> None:
        """Draw the next batch and send it to the engine, which generates it while this step trains."""
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
