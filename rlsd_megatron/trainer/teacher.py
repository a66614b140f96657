"""What the teacher reads and what it returns on the response tokens, by the method's record.

The teacher's context (`Method.teacher_context`): the question with the dataset's hint (RLSD,
OPSD, GRPO+OPSD), SDPO's prompt with a successful sibling's response, or OPD's student prompt,
each followed by the student's own response tokens (teacher forcing). It is scored with the
teacher policy's weights (live, frozen, EMA: `algorithms/teacher_policy.py`) or by OPD's separate
teacher model. The teacher's logits for distillation are `trainer/distillation.py`'s.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from rlsd_megatron import algorithms as alg
from rlsd_megatron.config import AlgorithmConfig
from rlsd_megatron.data.prompts import PromptDataset
from rlsd_megatron.data.teacher_context import TeacherSequence, remove_thinking
from rlsd_megatron.trainer.rollouts import Rollouts


def teacher_contexts(algorithm: AlgorithmConfig, rollouts: Rollouts, dataset: PromptDataset, *,
                     think_tag: str = "thought") -> list[TeacherSequence]:
    """The teacher's input for each of the P·G responses of `rollouts`, by `algorithm.method`'s
    teacher context: the privileged hint (dataset answer or reference solution) in the user turn,
    for SDPO a successful sibling's response, or the shortest correct and shortest incorrect
    sibling's (`algorithm.sdpo_demonstrations`; their `<think_tag>` spans removed when
    `algorithm.sdpo_remove_thinking`), for OPD the student's own prompt; each with the student
    prompt's images (a vision-language policy), so the teacher sees what the student saw."""
    kind = alg.get_method(algorithm.method).teacher_context
    rows = [rollouts.row_of(i) for i in range(len(rollouts.responses))]
    if kind == "student_prompt":
        return [TeacherSequence(row.prompt_ids + response, len(row.prompt_ids), len(response), images=row.images)
                for row, response in zip(rows, rollouts.responses)]
    if kind == "sibling":
        @functools.cache  # a sibling is the demonstration of up to G - 1 rollouts: decode it once
        def demonstration(d: int | None) -> str | None:
            if d is None:
                return None
            text = dataset.decode(rollouts.responses[d])
            return remove_thinking(text, think_tag) if algorithm.sdpo_remove_thinking else text

        if algorithm.sdpo_demonstrations == "shortest_correct_and_incorrect":  # the RLSD paper's SDPO run
            pairs = alg.select_sdpo_paper_demonstrations(
                rollouts.rewards, torch.tensor([len(r) for r in rollouts.responses]), rollouts.group_size,
                success_threshold=algorithm.sdpo_success_threshold)
            return [dataset.teacher_context.build_sdpo_paper(row.question, response, correct=demonstration(c),
                                                             incorrect=demonstration(w), images=row.images)
                    for row, response, (c, w) in zip(rows, rollouts.responses, pairs)]
        demos = alg.select_sdpo_demonstrations(rollouts.rewards, rollouts.group_size,
                                               success_threshold=algorithm.sdpo_success_threshold)
        return [dataset.teacher_context.build_sdpo(row.question, response, solution=demonstration(d),
                                                     images=row.images)
                for row, response, d in zip(rows, rollouts.responses, demos)]
    if kind == "hinted":
        return [dataset.teacher_context.build(row.question, row.answer, response,
                                              reference_solution=row.reference_solution, images=row.images)
                for row, response in zip(rows, rollouts.responses)]
    raise ValueError(f"algorithm.method={algorithm.method} has no teacher (teacher context {kind!r}); "
                     "the step asks for teacher contexts only for methods with one")


def teacher_response_outputs(contexts: list[TeacherSequence], per_token, *, learner, weights, teacher_model=None
                             ) -> dict[str, list[torch.Tensor]]:
    """`per_token(logits, micro_batch)` outputs on the teacher `contexts`, restricted to their
    response tokens (one [response_length] tensor per context and output name). Scored by
    `teacher_model` (OPD's separate model) when given, else by the `learner` with `weights` (the
    teacher policy's copy; None: the learner's own)."""
    scope = learner.use_weights(weights) if weights is not None else contextlib.nullcontext()
    scorer = teacher_model if teacher_model is not None else learner
    # No routed experts: under routing replay the teacher's routers still choose themselves, since the
    # engine's experts are those of the student's context, not of this one (learner.routing_replay).
    with scope:
        full = scorer.forward_sequences([torch.tensor(c.input_ids) for c in contexts], per_token,
                                        images=[c.images for c in contexts])
    return {name: [v[c.response_start: c.response_start + c.response_length] for v, c in zip(values, contexts)]
            for name, values in full.items()}
