"""The built-in reversed-addition task as a :class:`PromptDataset` (``data.task=reversed_addition``).

The problems, tokenizer and prompt formats are :mod:`rlsd_megatron.data.reversed_addition`'s;
this module only puts them behind the interface file datasets have, so the trainer treats both
the same. The renderer is ``user_text -> [<bos>] + chars(user_text + "=")``; the student's user
text is the question (``321+654``), the teacher's is ``question|answer`` (``321+654|9750``), which
reproduces the task's ``student_prompt`` and ``teacher_prompt`` exactly (``algorithm.teacher_template``
replaces the teacher's wording, in the task's characters).
"""

from __future__ import annotations

from typing import Sequence

from rlsd_megatron.data import reversed_addition as task
from rlsd_megatron.data.prompts import PromptDataset, PromptRow
from rlsd_megatron.data.readers import DataError
from rlsd_megatron.data.teacher_context import TeacherContextBuilder

__all__ = ["ADDITION_SDPO_TEMPLATE", "ADDITION_TEACHER_TEMPLATE", "ReversedAdditionPrompts"]

ADDITION_TEACHER_TEMPLATE = "{question}|{answer}"
ADDITION_SDPO_TEMPLATE = "{question}|{solution}"  # SDPO: a successful sibling's response as the hint
_OPERANDS = 1000  # operands are 0..999


class ReversedAdditionPrompts(PromptDataset):
    """Reversed 3-digit addition prompts with their privileged hint (the answer).

    ``split="train"``: all 10⁶ operand pairs, row ``i`` = ``(i // 1000) + (i % 1000)`` (the
    loader shuffles them); ``split="val"``: ``val_size`` problems from
    ``reversed_addition.sample_problems(val_size, val_seed)`` (the learner demo's validation set
    by default). ``teacher_template`` (``{question}``, ``{answer}``; None: ``question|answer``)
    must be written in the task's characters.
    """

    def __init__(self, split: str = "train", *, val_size: int = 256, val_seed: int = 10**6,
                 teacher_template: str | None = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} must be 'train' or 'val'.")
        self.name = f"reversed_addition/{split}"
        self.split = split
        self.tokenizer = task.CharTokenizer()
        self.pad_id, self.eos_id = self.tokenizer.pad_id, self.tokenizer.eos_id
        self._val = task.sample_problems(val_size, seed=val_seed) if split == "val" else None
        self.teacher_context = TeacherContextBuilder(self.render_prompt, max_reference_tokens=None,
                                                     template=teacher_template or ADDITION_TEACHER_TEMPLATE,
                                                     sdpo_template=ADDITION_SDPO_TEMPLATE)
        try:  # a wording outside the task's 16-character alphabet would fail at the first step
            self.render_prompt(self.teacher_context.hint_text("1+2", "3"))
        except ValueError as exc:
            raise DataError(f"algorithm.teacher_template={teacher_template!r} cannot be written in the "
                            f"{self.name} task's tokens: {exc}; use those characters only, or unset it "
                            f"(the task's own is {ADDITION_TEACHER_TEMPLATE!r}).") from None
        self.stats = {"rows": len(self)}

    def render_prompt(self, user_text: str) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(user_text + "=")]

    def problem(self, index: int) -> task.AdditionProblem:
        index = self._check_index(index)
        return self._val[index] if self._val is not None else task.AdditionProblem(*divmod(index, _OPERANDS))

    def __len__(self) -> int:
        return len(self._val) if self._val is not None else _OPERANDS * _OPERANDS

    def __getitem__(self, index: int) -> PromptRow:
        problem = self.problem(index)
        return PromptRow(index, problem.question, problem.answer, None, self.render_prompt(problem.question),
                         self.name)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))
