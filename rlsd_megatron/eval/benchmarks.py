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

Image benchmarks (a vision-language model): ``image_key`` names the column of each row's images
in the training data's layout (``data.images``: bytes, ``{"bytes", "path"}`` dicts or paths,
relative paths against the file's folder; one ``<image>`` placeholder per image in the question or
the choices, in order), bounded by ``min_pixels`` / ``max_pixels`` as ``data.min_pixels`` /
``data.max_pixels`` bound training images. A benchmark that mixes answer types names each row's
type in ``answer_type_key`` (and, for numeric rows, its tolerance in ``abs_tol_key``);
``prompt_templates`` gives a user-turn template per answer type. Bad rows (an unreadable image,
placeholders that do not match the images, a missing field, a gold answer its type cannot take)
fail the benchmark naming file and row, or with ``bad_rows: skip`` are counted in the result file
(``skipped_rows``) and left out, as ``data.bad_rows`` does for training rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlsd_megatron.config import DataConfig
from rlsd_megatron.data.images import IMAGE_PLACEHOLDER, ImageError
from rlsd_megatron.data.readers import DataError, read_rows
from rlsd_megatron.eval.answers import ANSWER_TYPES, gold_choice, parse_number

if TYPE_CHECKING:
    from rlsd_megatron.data.images import ImageReader

__all__ = ["BenchmarkRow", "BenchmarkSpec", "load_benchmark_specs", "read_benchmark", "read_benchmark_rows"]

logger = logging.getLogger(__name__)


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
    presence_penalty: float = 0.0  # rollout.engine.SamplingParams' (the recipe's validation: 1.5)
    # Per-row answer types: the column holding each row's type (one of ANSWER_TYPES; null: answer_type),
    # and for numeric rows the column of each row's absolute tolerance (null: abs_tol).
    answer_type_key: str | None = None
    abs_tol_key: str | None = None
    prompt_templates: dict[str, str] = field(default_factory=dict)  # answer type -> its rows' prompt_template
    # Images (a vision-language model): the column of each row's images (None: a text benchmark) and
    # the resized image's pixel bounds, as data.min_pixels / data.max_pixels (recipe 262144 / 1048576).
    image_key: str | None = None
    min_pixels: int = DataConfig.min_pixels
    max_pixels: int = DataConfig.max_pixels
    bad_rows: str = "error"  # error: a bad row fails the benchmark; skip: counted in the result and left out

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
        allowed = {"question", "choices"} if self.choices_key else {"question"}
        templates = {"prompt_template": self.prompt_template,
                     **{f"prompt_templates[{k}]": v for k, v in self.prompt_templates.items()}}
        for where, template in templates.items():
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            if "question" not in fields or not fields <= allowed:
                problems.append(f"{where} uses {sorted(fields)}; it needs {{question}} and may use only "
                                f"{sorted(allowed)} (write literal braces as {{{{ }}}})")
        unknown_types = sorted(set(self.prompt_templates) - set(ANSWER_TYPES))
        if unknown_types:
            problems.append(f"prompt_templates has {unknown_types}; its keys are answer types {list(ANSWER_TYPES)}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit={self.limit} (need >= 1, or leave it unset)")
        if not -2 <= self.presence_penalty <= 2:
            problems.append(f"presence_penalty={self.presence_penalty} (need -2 <= presence_penalty <= 2)")
        if not 0 < self.min_pixels <= self.max_pixels:
            problems.append(f"min_pixels={self.min_pixels} and max_pixels={self.max_pixels} must satisfy "
                            "0 < min_pixels <= max_pixels (recipe: 262144 and 1048576)")
        if self.bad_rows not in ("error", "skip"):
            problems.append(f"bad_rows={self.bad_rows!r}; expected error or skip")
        if problems:
            raise ValueError(f"benchmark {self.name!r}: " + "; ".join(problems) + ".")

    def settings(self) -> dict[str, Any]:
        """Every field: what a result file records, and what must match for it to be reused."""
        return dataclasses.asdict(self)

    def template(self, answer_type: str) -> str:
        """The user-turn template of a row of ``answer_type``."""
        return self.prompt_templates.get(answer_type, self.prompt_template)

    def image_settings(self) -> DataConfig:
        """The data settings :class:`~rlsd_megatron.data.images.ImageReader` reads: the pixel
        bounds (the stored-image limit stays training's, data.max_source_image_pixels)."""
        return DataConfig(min_pixels=self.min_pixels, max_pixels=self.max_pixels)


@dataclass(frozen=True)
class BenchmarkRow:
    """One problem: the ``question`` text, its ground-truth ``answer`` (text), ``choices`` (multiple
    choice with a choice list, else None), ``source`` (file and line), ``answer_type`` (the row's,
    else the benchmark's), ``abs_tol`` (a numeric row's own tolerance, else None), ``images`` (the
    row's image entries as stored, decoded when its prompt is built; empty for text) and
    ``base_dir`` (the folder relative image paths start from)."""

    question: str
    answer: str
    choices: list[str] | None
    source: str
    answer_type: str = "math"
    abs_tol: float | None = None
    images: list[Any] = field(default_factory=list, compare=False)
    base_dir: Path = Path(".")

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


class _BadRow(Exception):
    """A row the benchmark cannot use: ``kind`` (``data.prompts.BAD_ROW_KINDS``' vocabulary, plus
    ``bad_answer``) and the message."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_benchmark(spec: BenchmarkSpec,
                   images: "ImageReader | None" = None) -> tuple[list[BenchmarkRow], dict[str, int]]:
    """The rows of ``spec.file`` (the first ``spec.limit``), checked, and the counts of bad rows
    skipped by kind (``bad_rows: skip``; {} otherwise). Checked: a missing or empty field, an
    unknown answer type, a non-number answer for the numeric type, a gold answer that is no
    choice, and for an image benchmark the placeholders against the images and, given the
    model's ``images`` reader, every image decoded (as training rows are). A bad row raises
    :class:`~rlsd_megatron.data.readers.DataError` naming the file and line unless skipped."""
    if not Path(spec.file).is_file():
        raise DataError(f"benchmark {spec.name!r}: file {spec.file!r} does not exist (a relative path in the YAML is "
                        "relative to the YAML file's directory).")
    rows: list[BenchmarkRow] = []
    skipped: Counter[str] = Counter()
    examples: list[str] = []
    base_dir = Path(spec.file).parent
    for raw in read_rows(spec.file):
        if spec.limit is not None and len(rows) == spec.limit:
            break
        try:
            if raw.problem:
                raise _BadRow(raw.kind or "bad_json", raw.problem)
            rows.append(_row(spec, raw.where, raw.record, base_dir, images))
        except _BadRow as bad:
            if spec.bad_rows != "skip":
                raise DataError(f"{raw.where}: {bad}. Fix the row, or set bad_rows: skip in the benchmark to skip "
                                "and count such rows.") from None
            skipped[bad.kind] += 1
            examples.append(f"{raw.where}: {bad}")
    if examples:
        logger.warning("benchmark %s: skipped %d bad row(s) (bad_rows: skip); first: %s", spec.name, len(examples),
                       "; ".join(examples[:5]))
    if not rows:
        raise DataError(f"benchmark {spec.name!r}: {spec.file} has no rows"
                        f"{f' ({len(examples)} skipped as bad: {examples[0]})' if examples else ''}.")
    return rows, dict(sorted(skipped.items()))


def read_benchmark_rows(spec: BenchmarkSpec, images: "ImageReader | None" = None) -> list[BenchmarkRow]:
    """:func:`read_benchmark`'s rows."""
    return read_benchmark(spec, images)[0]


def _row(spec: BenchmarkSpec, where: str, record: dict[str, Any], base_dir: Path,
         images: "ImageReader | None") -> BenchmarkRow:
    question, answer = record.get(spec.question_key), record.get(spec.answer_key)
    if not isinstance(question, str) or not question.strip():
        raise _BadRow("missing_field", f"field {spec.question_key!r} (question_key) must be a non-empty string; the "
                                       f"row has {sorted(record)[:12]}")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise _BadRow("missing_field", f"field {spec.answer_key!r} (answer_key) must be a non-empty string or a "
                                       f"number; got {answer!r}")
    choices = None
    if spec.choices_key:
        choices = record.get(spec.choices_key)
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
            raise _BadRow("wrong_type", f"field {spec.choices_key!r} (choices_key) must be a list of strings; got "
                                        f"{choices!r}")
        choices = choices or None  # null or empty: a row without choices (a free-form row of a mixed benchmark)
    answer_type = record.get(spec.answer_type_key) if spec.answer_type_key else None
    answer_type = answer_type if answer_type is not None else spec.answer_type
    if answer_type not in ANSWER_TYPES:
        raise _BadRow("bad_answer", f"field {spec.answer_type_key!r} (answer_type_key) is {answer_type!r}; expected "
                                    f"one of {list(ANSWER_TYPES)}")
    abs_tol = record.get(spec.abs_tol_key) if spec.abs_tol_key else None
    if abs_tol is not None and (isinstance(abs_tol, bool) or not isinstance(abs_tol, (int, float))
                                or not math.isfinite(abs_tol) or abs_tol < 0):
        raise _BadRow("wrong_type", f"field {spec.abs_tol_key!r} (abs_tol_key) must be a number >= 0 or null; got "
                                    f"{abs_tol!r}")
    try:
        if answer_type == "multiple_choice":
            gold_choice(answer, choices)
        elif answer_type == "numeric" and parse_number(answer) is None:
            raise ValueError(f"the answer {answer!r} is not a number (answer_type numeric)")
    except ValueError as exc:
        raise _BadRow("bad_answer", str(exc)) from None
    entries = _image_entries(spec, record, question, choices)
    if entries and images is not None:
        try:
            images.check(entries, base_dir)
        except ImageError as exc:
            raise _BadRow("bad_image", str(exc)) from None
    return BenchmarkRow(question, answer, choices, where, answer_type, None if abs_tol is None else float(abs_tol),
                        entries, base_dir)


def _image_entries(spec: BenchmarkSpec, record: dict[str, Any], question: str, choices: list[str] | None) -> list[Any]:
    """The row's image entries (none for a text benchmark), as many as the question and choices
    hold placeholders (``image_count`` otherwise)."""
    if spec.image_key is None:
        return []
    entries = record.get(spec.image_key)
    if entries is None:
        entries = []
    elif not isinstance(entries, list):
        entries = [entries]  # one image stored bare
    placeholders = question.count(IMAGE_PLACEHOLDER) + sum(c.count(IMAGE_PLACEHOLDER) for c in choices or [])
    if placeholders != len(entries):
        raise _BadRow("image_count", f"the question and choices hold {placeholders} {IMAGE_PLACEHOLDER} "
                                     f"placeholder(s) but field {spec.image_key!r} (image_key) holds {len(entries)} "
                                     f"image(s); put one {IMAGE_PLACEHOLDER} where each image goes")
    return entries
