"""Rollouts of one step on one data-parallel rank: generation, rewards (refilled under DAPO's
dynamic sampling: `collect_rollouts`), the tensors the learner needs, and the log-probs the step
scores them with (`StepScores`).

The engine lives on the first rank of each model-parallel (TP×PP) group; that rank generates
its group's prompts and scores them, then broadcasts the results to the rest of the group, so
every rank of a data-parallel replica holds the same `Rollouts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from rlsd_megatron import algorithms as alg
from rlsd_megatron.data.prompts import PromptDataset, PromptRow
from rlsd_megatron.data.teacher_context import TeacherSequence
from rlsd_megatron.rollout.engine import Generation, RolloutEngine, SamplingParams
from rlsd_megatron.rollout.mismatch import LogProbMismatch


@dataclass
class Rollouts:
    """G responses for each of P prompts, group-contiguous (prompt-major)."""

    rows: list[PromptRow]  # [P]
    responses: list[list[int]]  # [P·G] token ids, end-of-sequence included when sampled
    engine_log_probs: list[list[float]]  # [P·G] the engine's log-prob of each response token
    finish_reasons: list[str]
    rewards: torch.Tensor  # [P·G]
    reward_metrics: dict[str, float] = field(default_factory=dict)
    behaviour_version: int | None = None  # the oldest engine weight version that sampled them (None: unknown)
    engine_metrics: dict[str, float] = field(default_factory=dict)  # `RolloutEngine.last_batch_metrics` of the draw
    # [P·G] the engine's experts of each token it ran (`Generation.routed_experts`); None: not recorded
    routed_experts: list[torch.Tensor] | None = None

    @property
    def group_size(self) -> int:
        return len(self.responses) // max(len(self.rows), 1)

    def row_of(self, i: int) -> PromptRow:
        return self.rows[i // self.group_size]

    def sequences(self) -> list[torch.Tensor]:
        """Student sequences: prompt ids + response ids."""
        return [torch.tensor(self.row_of(i).prompt_ids + r) for i, r in enumerate(self.responses)]

    def images(self) -> list:
        """The prompt images of each student sequence [P·G] (`ImageInputs`, None for text)."""
        return [self.row_of(i).images for i in range(len(self.responses))]

    def prompt_lengths(self) -> list[int]:
        """The prompt tokens before each response in its student sequence [P·G]."""
        return [len(self.row_of(i).prompt_ids) for i in range(len(self.responses))]

    def padded_response_mask(self) -> torch.Tensor:
        """[P·G, T] bool, True on each response's tokens (T: the longest response)."""
        return response_tensors([[1.0] * len(r) for r in self.responses]).bool()

    def on_sequences(self, values: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """Response-aligned values ([P·G, T] or one tensor per response, at least as long) placed
        on the student sequences: per sequence a float [prompt + response] tensor, 0 on the prompt."""
        return [torch.cat([torch.zeros(n), v[: len(r)]])
                for n, v, r in zip(self.prompt_lengths(), values, self.responses)]

    def on_responses(self, per_sequence: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-token values of the student sequences (as `sequences()`) restricted to the responses."""
        return [v[n:] for v, n in zip(per_sequence, self.prompt_lengths())]

    def routed_experts_on_sequences(self) -> list[torch.Tensor] | None:
        """The engine's experts of every token of each student sequence, [L_i, layers, top-k] int16
        (the learner's `learner.batch.ROUTED_EXPERTS` field), -1 on the last token, which the engine
        sampled but never ran; None when the engine recorded none."""
        if self.routed_experts is None:
            return None
        out = []
        for i, (routed, sequence) in enumerate(zip(self.routed_experts, self.sequences())):
            if routed.shape[0] != len(sequence) - 1:
                raise RuntimeError(f"rollout {i}: the engine recorded experts for {routed.shape[0]} tokens, its "
                                   f"sequence has {len(sequence)} (prompt + response - 1 expected)")
            last = torch.full((1, *routed.shape[1:]), -1, dtype=torch.int16)
            out.append(torch.cat([routed.to(torch.int16), last]))
        return out

    def response_mask(self) -> list[torch.Tensor]:
        """1 on response tokens of each student sequence (aligned with `sequences()`)."""
        return self.on_sequences([torch.ones(len(r)) for r in self.responses])

    def select_groups(self, keep: torch.Tensor) -> "Rollouts":
        """The prompts (and their G responses) where `keep` [P] is True."""
        g = self.group_size
        idx = [p * g + j for p in range(len(self.rows)) if keep[p] for j in range(g)]
        return Rollouts(
            rows=[row for row, k in zip(self.rows, keep) if k],
            responses=[self.responses[i] for i in idx],
            engine_log_probs=[self.engine_log_probs[i] for i in idx],
            finish_reasons=[self.finish_reasons[i] for i in idx],
            rewards=self.rewards[idx] if idx else torch.zeros(0),
            reward_metrics=self.reward_metrics,
            behaviour_version=self.behaviour_version,
            engine_metrics=self.engine_metrics,
            routed_experts=[self.routed_experts[i] for i in idx] if self.routed_experts is not None else None,
        )

    @staticmethod
    def concat(parts: list["Rollouts"]) -> "Rollouts":
        return Rollouts(
            rows=[r for p in parts for r in p.rows],
            responses=[r for p in parts for r in p.responses],
            engine_log_probs=[r for p in parts for r in p.engine_log_probs],
            finish_reasons=[r for p in parts for r in p.finish_reasons],
            rewards=torch.cat([p.rewards for p in parts]) if parts else torch.zeros(0),
            reward_metrics=parts[0].reward_metrics if parts else {},  # the unfiltered first draw
            behaviour_version=_oldest([p.behaviour_version for p in parts]),
            engine_metrics=parts[0].engine_metrics if parts else {},
            routed_experts=[r for p in parts for r in p.routed_experts]
            if parts and all(p.routed_experts is not None for p in parts) else None,
        )


@dataclass(frozen=True)
class StepScores:
    """Per-token log-probs of one step's rollouts, temperature-scaled as the engine samples."""

    sequences: list[torch.Tensor]  # the student sequences: prompt + response ids
    student: list[torch.Tensor] | None  # per sequence, aligned with its tokens (the ratio's old log-probs);
    # None: taken from the update's forward (train.student_log_probs_in_update)
    reference: list[torch.Tensor] | None  # the KL reference's, aligned the same way; None: no KL term
    teacher_contexts: list[TeacherSequence] | None  # None: no teacher read this step
    teacher: list[torch.Tensor] | None  # the teacher's, of each response's tokens; None: not read
    mismatch: LogProbMismatch | None  # the student's vs the engine's log-probs of the response tokens


def response_tensors(values: list[list[float]] | list[torch.Tensor], width: int | None = None) -> torch.Tensor:
    """Right-padded [B, T] float tensor of per-response values."""
    width = width if width is not None else max((len(v) for v in values), default=0)
    out = torch.zeros(len(values), width)
    for i, v in enumerate(values):
        out[i, : len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return out


def generate_and_score(rows: list[PromptRow], dataset: PromptDataset, engine: RolloutEngine | None,
                       sampling: SamplingParams, scorer, *, group: dist.ProcessGroup | None,
                       prompt_offset: int) -> Rollouts:
    """Generate `sampling.n` responses per row on the engine-hosting rank, score them, and
    broadcast the result over `group` (the model-parallel group)."""
    payload = None
    if engine is not None:
        generations = engine.generate([row.prompt_ids for row in rows], sampling, prompt_offset=prompt_offset,
                                      images=prompt_images(rows))
        payload = score_generations(rows, dataset, generations, sampling.n, scorer)
        payload.engine_metrics = engine.last_batch_metrics()
    return share_over(payload, group)


def prompt_images(rows: list[PromptRow]) -> list | None:
    """Each row's images for the engine (a vision-language policy's prompts), None for text rows."""
    return [row.images for row in rows] if any(row.images is not None for row in rows) else None


def _oldest(versions: list[int | None]) -> int | None:
    return None if not versions or None in versions else min(versions)


def score_generations(rows: list[PromptRow], dataset: PromptDataset, generations: list[Generation], n: int,
                      scorer) -> Rollouts:
    """The `Rollouts` of `n` generations per row (prompt-major), rewarded by `scorer`."""
    from rlsd_megatron.rewards import RewardSample

    samples = [
        RewardSample(response=dataset.decode(gen.token_ids), ground_truth=rows[i // n].answer,
                     response_length=len(gen.token_ids), response_ids=gen.token_ids, question=rows[i // n].question)
        for i, gen in enumerate(generations)
    ]
    result = scorer.score(samples)
    routed = [gen.routed_experts for gen in generations]
    return Rollouts(rows, [gen.token_ids for gen in generations], [gen.log_probs for gen in generations],
                    [gen.finish_reason for gen in generations], result.rewards, result.metrics(),
                    behaviour_version=_oldest([gen.weight_version for gen in generations]),
                    routed_experts=routed if all(r is not None for r in routed) else None)


def share_over(payload: Rollouts | None, group: dist.ProcessGroup | None) -> Rollouts:
    """The host's (group rank 0's) rollouts on every rank of `group` (the replica group)."""
    if group is not None and dist.get_world_size(group) > 1:
        holder = [payload]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
        payload = holder[0]
    return payload


def collect_rollouts(draw: Callable[[], Rollouts], *, want: int, group_size: int, dynamic_sampling: bool,
                     max_rounds: int) -> Rollouts:
    """This rank's rollouts of `want` prompts: one `draw()` (the next batch of prompts, generated
    and scored), or under DAPO's dynamic sampling draws, at most `max_rounds`, that keep only
    the prompts whose `group_size` rewards are not all equal until `want` are kept (the first
    `want` of them; `rollout/kept_prompt_frac` is the share of drawn prompts kept)."""
    parts: list[Rollouts] = []
    kept = 0
    for _ in range(max_rounds if dynamic_sampling else 1):
        batch = draw()
        if dynamic_sampling:
            batch = batch.select_groups(alg.dynamic_sampling_keep_mask(batch.rewards, group_size))
        parts.append(batch)
        kept += len(batch.rows)
        if kept >= want:
            break
    rollouts = Rollouts.concat(parts)
    if dynamic_sampling:
        rollouts = rollouts.select_groups(torch.arange(len(rollouts.rows)) < want)
        rollouts.reward_metrics = {**rollouts.reward_metrics, "rollout/kept_prompt_frac": kept / (want * len(parts))}
    return rollouts
