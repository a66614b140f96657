"""Grades a benchmark's responses by its answer type; math through the sandboxed verifier pool.

Multiple choice, numeric and exact answers are graded in-process (``eval.answers``: linear-time
text handling). Math answers are graded as the training reward grades them:
``rewards.math_answer.math_accuracy`` in a :class:`~rlsd_megatron.rewards.verifier_pool.VerifierPool`
(sympy can hang on adversarial LaTeX; a timeout or a crash scores 0 and is counted), started on
the first math benchmark and kept for the rest.
"""

from __future__ import annotations

import os
from typing import Sequence

from rlsd_megatron.eval.answers import Graded, grade_exact, grade_multiple_choice, grade_numeric
from rlsd_megatron.eval.benchmarks import BenchmarkRow, BenchmarkSpec
from rlsd_megatron.rewards.math_answer import extract_answer, normalize_tag_spacing

__all__ = ["ResponseGrader"]


class ResponseGrader:
    """``grade(spec, rows, responses)`` → one :class:`Graded` per response (``rows[i]`` is the
    problem of ``responses[i]``). ``timeouts`` / ``errors`` count math answers the pool could not
    grade (each scored 0). ``num_workers`` verifier processes (default ``min(4, cpu count)``),
    ``timeout_s`` per math answer. Close it (or use ``with``) to stop the workers."""

    def __init__(self, *, num_workers: int | None = None, timeout_s: float = 10.0) -> None:
        self.num_workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        self.timeout_s = timeout_s
        self.timeouts = self.errors = 0
        self._pool = None

    def grade(self, spec: BenchmarkSpec, rows: Sequence[BenchmarkRow], responses: Sequence[str]) -> list[Graded]:
        """Each response by its row's answer type (``row.answer_type``: a mixed benchmark's rows
        differ), numeric ones with the row's own tolerance when it has one."""
        if len(rows) != len(responses):
            raise ValueError(f"{len(responses)} responses for {len(rows)} rows; give one row per response.")
        graded: list[Graded | None] = [None] * len(rows)
        math_rows = [i for i, row in enumerate(rows) if row.answer_type == "math"]
        if math_rows:
            for i, grade in zip(math_rows, self._grade_math([rows[i] for i in math_rows],
                                                           [responses[i] for i in math_rows])):
                graded[i] = grade
        for i, (row, response) in enumerate(zip(rows, responses)):
            if row.answer_type == "multiple_choice":
                graded[i] = grade_multiple_choice(response, row.answer, row.choices)
            elif row.answer_type == "numeric":
                graded[i] = grade_numeric(response, row.answer, rel_tol=spec.rel_tol,
                                          abs_tol=spec.abs_tol if row.abs_tol is None else row.abs_tol)
            elif row.answer_type == "exact":
                graded[i] = grade_exact(response, row.answer, case_sensitive=spec.case_sensitive)
        return graded

    def _grade_math(self, rows: Sequence[BenchmarkRow], responses: Sequence[str]) -> list[Graded]:
        if self._pool is None:
            from rlsd_megatron.rewards.verifier_pool import VerifierPool

            self._pool = VerifierPool("rlsd_megatron.rewards.math_answer:math_accuracy", num_workers=self.num_workers,
                                      timeout_s=self.timeout_s, warmup=(["<answer>0.5</answer>", "\\frac{1}{2}"], {}))
        texts = [normalize_tag_spacing(r) for r in responses]
        outcomes = self._pool.map([([text, row.answer], {}) for text, row in zip(texts, rows)])
        graded = []
        for text, outcome in zip(texts, outcomes):
            self.timeouts += outcome.status == "timeout"
            self.errors += outcome.status == "error"
            # maj@n votes on the extracted string: equivalent forms ("0.5", "1/2") vote apart.
            answer = extract_answer(text) or None
            graded.append(Graded(answer, float(outcome.value) if outcome.status == "ok" else 0.0))
        return graded

    def close(self) -> None:
        """Stop the verifier workers, if started (idempotent)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "ResponseGrader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
