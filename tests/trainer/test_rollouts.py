"""Rollouts' placement of response-aligned values on the student sequences, and DAPO's refill,
against hand-written cases."""

import pytest
import torch

from rlsd_megatron.data.prompts import PromptRow
from rlsd_megatron.trainer.rollouts import Rollouts, collect_rollouts


def rollouts(prompt_lengths: list[int], responses: list[list[int]], rewards: list[float]) -> Rollouts:
    """One prompt per entry of `prompt_lengths`, its group the matching slice of `responses`."""
    rows = [PromptRow(i, f"q{i}", "a", None, list(range(100, 100 + n)), "test") for i, n in enumerate(prompt_lengths)]
    return Rollouts(rows, responses, [[-1.0] * len(r) for r in responses], ["stop"] * len(responses),
                    torch.tensor(rewards))


def test_values_go_on_the_response_tokens_of_each_sequence():
    batch = rollouts([3, 1], [[1, 2], [3], [4, 5, 6], []], [1.0, 0.0, 0.0, 1.0])
    assert batch.prompt_lengths() == [3, 3, 1, 1]
    values = torch.tensor([[0.5, 0.6, 9.0], [0.7, 9.0, 9.0], [0.1, 0.2, 0.3], [9.0, 9.0, 9.0]])  # 9: padding
    placed = batch.on_sequences(values)
    want = [[0, 0, 0, 0.5, 0.6], [0, 0, 0, 0.7], [0, 0.1, 0.2, 0.3], [0]]
    assert [p.tolist() for p in placed] == [torch.tensor(w).tolist() for w in want]
    assert [len(p) for p in placed] == [len(s) for s in batch.sequences()]
    assert [r.tolist() for r in batch.on_responses(placed)] == [torch.tensor(v).tolist() for v in
                                                                ([0.5, 0.6], [0.7], [0.1, 0.2, 0.3], [])]
    assert [m.tolist() for m in batch.response_mask()] == [[0, 0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1], [0]]
    assert batch.padded_response_mask().tolist() == [[True, True, False], [True, False, False],
                                                     [True, True, True], [False, False, False]]


def test_dynamic_sampling_keeps_mixed_groups_until_the_batch_is_full():
    # Draw 1: prompt 0 all-equal (dropped), prompt 1 mixed; draw 2: both mixed, one too many.
    draws = iter([rollouts([1, 2], [[1], [2], [3], [4]], [1.0, 1.0, 0.0, 1.0]),
                  rollouts([3, 4], [[5], [6], [7], [8]], [0.0, 1.0, 1.0, 0.0])])
    batch = collect_rollouts(lambda: next(draws), want=2, group_size=2, dynamic_sampling=True, max_rounds=4)
    assert [row.question for row in batch.rows] == ["q1", "q0"]  # the second draw's rows are q0, q1 again
    assert [len(row.prompt_ids) for row in batch.rows] == [2, 3]
    assert batch.responses == [[3], [4], [5], [6]]
    assert batch.reward_metrics["rollout/kept_prompt_frac"] == 3 / 4  # 3 of the 4 drawn prompts were mixed


def test_without_dynamic_sampling_one_draw_is_the_batch():
    draws = iter([rollouts([1, 2], [[1], [2], [3], [4]], [1.0, 1.0, 0.0, 1.0])])
    batch = collect_rollouts(lambda: next(draws), want=2, group_size=2, dynamic_sampling=False, max_rounds=4)
    assert batch.responses == [[1], [2], [3], [4]] and "rollout/kept_prompt_frac" not in batch.reward_metrics


def test_routed_experts_follow_their_rollouts_onto_the_sequences():
    """Routing replay: each rollout's recorded experts (every token but the last) survive DAPO's
    group selection and concatenation, and reach the learner as [L, layers, k] with -1 on the last
    token; a record of the wrong length is an error, not a silent misalignment."""
    def recorded(batch: Rollouts, first: int) -> Rollouts:
        batch.routed_experts = [torch.full((len(row) - 1, 2, 1), first + i, dtype=torch.uint8)
                                for i, row in enumerate(batch.sequences())]
        return batch

    draws = iter([recorded(rollouts([1, 2], [[1], [2], [3], [4]], [1.0, 1.0, 0.0, 1.0]), 10),
                  recorded(rollouts([3, 4], [[5, 6], [6], [7], [8]], [0.0, 1.0, 1.0, 0.0]), 20)])
    batch = collect_rollouts(lambda: next(draws), want=2, group_size=2, dynamic_sampling=True, max_rounds=4)
    placed = batch.routed_experts_on_sequences()
    assert [len(p) for p in placed] == [len(s) for s in batch.sequences()]
    assert [int(p[0, 0, 0]) for p in placed] == [12, 13, 20, 21]  # draw 1's prompt 1, draw 2's prompt 0
    assert all(p.dtype == torch.int16 and (p[-1] == -1).all() and (p[:-1] >= 0).all() for p in placed)
    assert rollouts([1], [[1]], [0.0]).routed_experts_on_sequences() is None
    batch.routed_experts[0] = batch.routed_experts[0][:-1]
    with pytest.raises(RuntimeError, match="rollout 0: the engine recorded experts for 1 tokens, its sequence has 3"):
        batch.routed_experts_on_sequences()


def test_routing_replay_without_recorded_experts_stops_the_step():
    """With rollout.routing_replay on, rollouts without the engine's experts would be scored and
    trained with free routing, silently: the step refuses them before any forward."""
    from rlsd_megatron.config import Config
    from rlsd_megatron.trainer.scoring import StepScoring

    cfg = Config()
    cfg.rollout.routing_replay = True
    scoring = StepScoring(cfg, learner=None, dataset=None, reference=None, teacher=None)  # refused before any is used
    with pytest.raises(RuntimeError, match="rollout.routing_replay is on but this step's rollouts carry no routed"):
        scoring.score(rollouts([1], [[1]], [0.0]), step=1)
