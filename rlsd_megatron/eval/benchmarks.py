"""Benchmark settings (the YAML list ``rlsd-eval --benchmarks`` reads) and benchmark rows.

A benchmark is one file (``.jsonl`` / ``.json`` / ``.parquet``, read by ``data.readers``) with its
own sampling, prompt and answer settings::

    benchmarks:                       # or the list alone at the top level
      - name: addition_3digit         # names the result file: letters, digits, . _ -
        file: reversed_addition/heldout_3digit.jsonl   # relative to this YAML file's directory
        n: 8                          # samples per problem
        temperature: 0.7
        max_new_tokens: 8
        answer_type: exact            # math | multiple_choice | numeric | exact
        pass_k: [1, 4, 8]

Every field and its default is :class:`BenchmarkSpec`'s. Unknown keys are refused (a misspelt
``temprature`` must not silently evaluate at the default).
"""

from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsd_megatron.data.readers import DataError, read_rows
from rlsd_megatron.eval.answers import ANSWER_TYPES, gold_choice, parse_number

__all__ = ["BenchmarkRow", "BenchmarkSpec", "load_benchmark_specs", "read_benchmark_rows"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark's settings (see the module docstring for the YAML form)."""

    name: str
    file: str
    n: int = 1  # samples per problem; avg@n, maj@n over them
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = -1  # <= 0: off
    max_new_tokens: int = 1024  # a sample that reaches it counts as truncated
    prompt_template: str = "{question}"  # the user turn; {question}, and {choices} for multiple choice
    system_prompt: str | None = None  # HF chat models only
    answer_type: str = "math"  # math (sandboxed math-verify), multiple_choice, numeric, exact
    question_key: str = "question"
    answer_key: str = "answer"
    choices_key: str | None = None  # multiple choice: a list of option texts per row (letters A, B, ... in order)
    pass_k: list[int] = field(default_factory=lambda: [1])  # each k <= n
    rel_tol: float = 1e-6  # numeric: |answer - gold| <= abs_tol + rel_tol * |gold|
    abs_tol: float = 0.0
    case_sensitive: bool = True  # exact
    seed: int = 0  # sample j of problem i uses rollout.engine.sample_seed(seed, i, j)
    limit: int | None = None  # evaluate the first `limit` rows only

    def __post_init__(self):
        problems = []
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            problems.append(f"name={self.name!r} must use letters, digits, '.', '_' and '-' only (it names a file)")
        if self.answer_type not in ANSWER_TYPES:
            problems.append(f"answer_type={self.answer_type!r}; expected one of {list(ANSWER_TYPES)}")
        if self.n < 1:
            problems.append(f"n={self.n} (need >= 1)")
        bad_k = [k for k in self.pass_k if not 1 <= k <= self.n]
        if bad_k:
            problems.append(f"pass_k={self.pass_k} has {bad_k} outside 1..n={self.n}")
        fields = {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None}
        allowed = {"question", "choices"} if self.choices_key else {"question"}
        if "question" not in fields or not fields <= allowed:
            problems.append(f"prompt_template uses {sorted(fields)}; it needs {{question}} and may use only "
                            f"{sorted(allowed)} (write literal braces as {{{{ }}}})")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit={self.limit} (need >= 1, or leave it unset)")
        if problems:
            raise ValueError(f"benchmark {self.name!r}: " + "; ".join(problems) + ".")

    def settings(self) -> dict[str, Any]:
        """Every field: what a result file records, and what must match for it to be reused."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BenchmarkRow:
    """One problem: the ``question`` text, its ground-truth ``answer`` (text), ``choices`` (multiple
    choice with a choice list, else None) and ``source`` (file and line)."""

    question: str
    answer: str
    choices: list[str] | None
    source: str

    def user_text(self, template: str) -> str:
        """The user turn: ``template`` with the question and, when present, the lettered choices."""
        choices = "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(self.choices or []))
        return template.format(question=self.question.strip(), choices=choices)


def load_benchmark_specs(path: str | Path) -> list[BenchmarkSpec]:
    """The benchmarks of a YAML file: a list of mappings, or one under ``benchmarks:``. Relative
    ``file`` paths are resolved against the YAML file's directory. Raises ValueError naming the
    entry for unknown keys, bad values and repeated names."""
    import yaml

    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    entries = raw.get("benchmarks") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of benchmarks (at the top level or under "
                         f"'benchmarks:'), got {type(entries).__name__}.")
    known = {f.name for f in dataclasses.fields(BenchmarkSpec)}
    specs = []
    for i, entry in enumerate(entries):
        where = f"{path}, benchmark {i + 1}"
        if not isinstance(entry, dict) or "name" not in entry or "file" not in entry:
            raise ValueError(f"{where}: each benchmark is a mapping with at least 'name' and 'file'; got {entry!r}.")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{where} ({entry['name']!r}): unknown key(s) {unknown}; known: {sorted(known)}.")
        file = Path(str(entry["file"]))
        entry = {**entry, "file": str(file if file.is_absolute() else path.parent / file)}
        specs.append(BenchmarkSpec(**entry))
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{path}: benchmark names must be unique (they name result files); repeated: {repeated}.")
    return specs


def read_benchmark_rows(spec: BenchmarkSpec) -> list[BenchmarkRow]:
    """The rows of ``spec.file`` (the first ``spec.limit``), checked: a missing or empty field, a
    non-number answer for the numeric type, or a gold answer that is no choice raises
    :class:`~rlsd_megatron.data.readers.DataError` naming the file and line."""
    if not Path(spec.file).is_file():
        raise DataError(f"benchmark {spec.name!r}: file {spec.file!r} does not exist (a relative path in the YAML is "
                        "relative to the YAML file's directory).")
    rows: list[BenchmarkRow] = []
    for raw in read_rows(spec.file):
        if spec.limit is not None and len(rows) == spec.limit:
            break
        if raw.problem:
            raise DataError(f"{raw.where}: {raw.problem}.")
        rows.append(_row(spec, raw.where, raw.record))
    if not rows:
        raise DataError(f"benchmark {spec.name!r}: {spec.file} has no rows.")
    return rows


def _row(spec: BenchmarkSpec, where: str, record: dict[str, Any]) -> BenchmarkRow:
    question, answer = record.get(spec.question_key), record.get(spec.answer_key)
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field {spec.question_key!r} (question_key) must be a non-empty string; the row "
                        f"has {sorted(record)[:12]}.")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}: field {spec.answer_key!r} (answer_key) must be a non-empty string or a number; "
                        f"got {answer!r}.")
    choices = None
    if spec.choices_key:
        choices = record.get(spec.choices_key)
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field {spec.choices_key!r} (choices_key) must be a list of strings; "
                            f"got {choices!r}.")
    try:
        if spec.answer_type == "multiple_choice":
            gold_choice(answer, choices)
        elif spec.answer_type == "numeric" and parse_number(answer) is None:
            raise ValueError(f"the answer {answer!r} is not a number (answer_type numeric)")
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from None
    return BenchmarkRow(question, answer, choices, where)
