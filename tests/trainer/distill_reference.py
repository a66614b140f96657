"""The distillation update as it was before issue 15, kept as a reference (tests) and a baseline
(benchmarks/distill_memory.py): the teacher scores every sequence of the step first, its logits
([L, V/TP] per sequence) are broadcast to every pipeline stage and moved to the host, and the
update reads them as a `teacher_logits` field aligned with the student's tokens (0 on the
student's prompt). The product computes the same logits a chunk at a time
(rlsd_megatron/trainer/distillation.py)."""

from __future__ import annotations

import contextlib

import torch

from rlsd_megatron.trainer.distillation import TeacherInputs


def with_all_teacher_logits(learner, fields: dict[str, list[torch.Tensor]], teacher: TeacherInputs
                            ) -> dict[str, list[torch.Tensor]]:
    """`fields` plus `teacher_logits`: for each sequence, zeros for the student's prompt, then the
    teacher's logits predicting each response token ([P_i + R_i, V/TP], on the host, every stage)."""
    scope = learner.use_weights(teacher.weights) if teacher.weights is not None else contextlib.nullcontext()
    with scope:
        full = learner.forward_sequences([torch.tensor(c.input_ids) for c in teacher.contexts],
                                         lambda logits, mb: {"logits": logits.detach()})["logits"]
    response = [v[c.response_start: c.response_start + c.response_length] for v, c in zip(full, teacher.contexts)]
    return {**fields, "teacher_logits": [torch.cat([lg.new_zeros(n, lg.shape[-1]), lg])
                                         for n, lg in zip(teacher.prompt_lengths, response)]}
