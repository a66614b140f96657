"""Prompt datasets: what the trainer draws rows from, for files and built-in tasks alike.

A :class:`PromptDataset` is a sized, indexable collection of :class:`PromptRow` s plus the two
things that turn a row into model input: ``render_prompt(user_text) -> ids`` (one user turn
through the start of the assistant turn) and ``teacher_context``, a
:class:`~rlsd_megatron.data.teacher_context.TeacherContextBuilder` on that *same* renderer, so
student and self-teacher prompts differ only in the user text (spec §2).

Where the teacher context is built: the trainer, after generation, calls
``dataset.teacher_context.build(row.question, row.answer, response_ids,
reference_solution=row.reference_solution)``; the row carries everything it needs (raw question,
answer, optional reference solution, truncated to ``data.max_solution_tokens`` there) and the
student prompt ids, so nothing needs the dataset files again.

:class:`FilePromptDataset` reads JSON Lines / JSON / Parquet files and validates every row at
load, so a bad row fails the run at start-up, naming file and line, not hours in; with
``data.bad_rows=skip`` it is counted in ``stats`` (and a warning lists the first few) instead.
Given a ``vision`` config (a vision-language policy) its rows may carry images
(``data.images``: ``<image>`` placeholders in the question, an ``images`` column); every image is
decoded at load (a bad one is a bad row like any other) and processed into pixel patches when its
row is drawn (``PromptRow.images``), the prompt ids holding its placeholder tokens.
"""

from __future__ import annotations

import logging
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rlsd_megatron.config import DataConfig, VisionConfig
from rlsd_megatron.data.images import IMAGE_PLACEHOLDER, ImageError, ImageReader, expand_image_tokens
from rlsd_megatron.data.readers import DataError, read_rows
from rlsd_megatron.data.teacher_context import (RLSD_TEACHER_TEMPLATE, PromptRenderer, TeacherContextBuilder,
                                                hf_chat_renderer, hf_text_truncator)

__all__ = ["BAD_ROW_KINDS", "MATH_STUDENT_TEMPLATE", "FilePromptDataset", "PromptDataset", "PromptRow"]

logger = logging.getLogger(__name__)

# The reference recipe's math instruction (its unified.jinja, math branch), before the raw
# question; the tags must match reward.think_tag / reward.answer_tag.
MATH_STUDENT_TEMPLATE = (
    "You are an intelligent assistant capable of solving mathematical problems.\n\n"
    "[MATHEMATICS Tasks]\n"
    "- Goal: Solve the math problem.\n"
    "- Format: You FIRST think about the reasoning process as an internal monologue enclosed within "
    "<thought> </thought> tags. The final answer MUST be enclosed within <answer> </answer> tags.\n\n"
    "{question}"
)

BAD_ROW_KINDS = ("not_utf8", "bad_json", "missing_field", "wrong_type", "empty_field", "prompt_too_long", "bad_image",
                 "image_count")


@dataclass(frozen=True)
class PromptRow:
    """One prompt: ``index`` in its dataset, ``question`` (raw problem text), ``answer`` (ground
    truth, the reward's reference and the teacher's default hint), ``reference_solution`` (a
    longer hint, or None), ``prompt_ids`` (the student prompt, rendered, image placeholder tokens
    included), ``source`` (file and line, or the task name), ``images`` (the prompt's
    ``ImageInputs``, or None)."""

    index: int
    question: str
    answer: str
    reference_solution: str | None
    prompt_ids: list[int]
    source: str
    images: Any = field(default=None, compare=False)


class PromptDataset:
    """Base of prompt datasets: ``len``, ``dataset[i] -> PromptRow``, ``render_prompt``,
    ``teacher_context``, ``tokenizer``, ``pad_id``, ``eos_id``, ``decode(ids) -> str`` (response
    text for rewards) and ``stats`` (counts for logging)."""

    name: str
    tokenizer: Any
    render_prompt: PromptRenderer
    teacher_context: TeacherContextBuilder
    pad_id: int
    eos_id: int
    stats: dict[str, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> PromptRow:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} is out of range for {self.name} ({len(self)} rows).")
        return index


class FilePromptDataset(PromptDataset):
    """Prompts from ``files`` (``.jsonl``, ``.json``, ``.parquet``), fields per ``cfg``.

    A row needs ``cfg.question_key`` (a non-empty string) and ``cfg.answer_key`` (a non-empty
    string, or a number, kept as its text); ``cfg.solution_key``, when set, is optional per row
    (a string or null; rows without one use the answer as the hint, counted in
    ``stats["rows_without_solution"]``). The student prompt is
    ``render_prompt(student_template.format(question=question.strip()))`` and must fit in
    ``cfg.max_prompt_length`` tokens. Bad rows (:data:`BAD_ROW_KINDS`) raise :class:`DataError`
    naming file and row, or with ``cfg.bad_rows == "skip"`` are counted in
    ``stats["skipped_<kind>"]`` (the first 20 messages in ``skipped_examples``). ``system_prompt`` and ``chat_template_kwargs`` go to
    :func:`~rlsd_megatron.data.teacher_context.hf_chat_renderer`; ``teacher_template`` to the
    :class:`~rlsd_megatron.data.teacher_context.TeacherContextBuilder`. ``vision`` (a
    vision-language policy's) turns on images (module docstring), processed as in
    :class:`~rlsd_megatron.data.images.ImageReader` with ``cfg.tokenizer_dir``'s processor settings.
    """

    def __init__(self, files: Sequence[str], cfg: DataConfig, tokenizer: Any, *,
                 student_template: str = MATH_STUDENT_TEMPLATE, system_prompt: str | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None,
                 teacher_template: str = RLSD_TEACHER_TEMPLATE, vision: VisionConfig | None = None) -> None:
        if not files:
            raise DataError("no data files given (data.train_files / data.val_files is empty).")
        fields = {f for _, f, _, _ in string.Formatter().parse(student_template) if f is not None}
        if fields != {"question"}:
            raise DataError(f"the student prompt template must use {{question}} and no other placeholder (write "
                            f"literal braces as {{{{ }}}}); it has {sorted(fields)}: {student_template[:80]!r}.")
        self.name = ", ".join(str(f) for f in files)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vision = vision
        self.images = ImageReader(vision, cfg, cfg.tokenizer_dir) if vision is not None else None
        self.render_prompt = hf_chat_renderer(tokenizer, system_prompt=system_prompt,
                                              chat_template_kwargs=chat_template_kwargs,
                                              image_placeholder=IMAGE_PLACEHOLDER if vision is not None else None)
        image_tokens = (vision.image_token_id, vision.spatial_merge_size) if vision is not None else None
        self.teacher_context = TeacherContextBuilder(self.render_prompt, truncate_text=hf_text_truncator(tokenizer),
                                                     max_reference_tokens=cfg.max_solution_tokens,
                                                     template=teacher_template, student_template=student_template,
                                                     image_tokens=image_tokens)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # question, answer, solution, source, image entries (as stored: decoded when drawn), their folder
        self._rows: list[tuple[str, str, str | None, str, list[Any], Path]] = []
        self.stats = self._load(files)

    def _load(self, files: Sequence[str]) -> dict[str, int]:
        """Read and validate every row of ``files``; returns the counts for ``stats``."""
        counts: Counter[str] = Counter()
        skipped: list[str] = []
        for path in files:
            for raw in read_rows(path):
                counts["rows_read"] += 1
                kind, message = (raw.kind, raw.problem) if raw.problem else self._add(
                    raw.where, raw.record, counts, Path(path).parent)
                if kind is None:
                    continue
                if self.cfg.bad_rows != "skip":
                    raise DataError(f"{raw.where}: {message}. Fix the row, or set data.bad_rows=skip to skip "
                                    "and count such rows.")
                counts[f"skipped_{kind}"] += 1
                skipped.append(f"{raw.where}: {message}")
        if skipped:
            logger.warning("skipped %d bad row(s) of %s (data.bad_rows=skip); first: %s", len(skipped), self.name,
                           "; ".join(skipped[:5]))
        if not self._rows:
            raise DataError(f"{self.name}: no usable rows ({counts['rows_read']} read, {len(skipped)} skipped as "
                            f"bad{': ' + skipped[0] if skipped else ''}).")
        self.skipped_examples = skipped[:20]
        return {"rows_read": counts["rows_read"], "rows": len(self._rows), "skipped": len(skipped),
                **{f"skipped_{k}": counts[f"skipped_{k}"] for k in BAD_ROW_KINDS},
                "rows_without_solution": counts["rows_without_solution"]}

    def _student_ids(self, question: str, image_counts: Sequence[int] = ()) -> list[int]:
        ids = self.render_prompt(self.teacher_context.student_text(question))
        if self.vision is None:
            return list(ids)
        return expand_image_tokens(ids, image_counts, self.vision.image_token_id)

    def _image_entries(self, record: dict[str, Any], question: str) -> tuple[str | None, str | list[Any]]:
        """The row's image entries, or (kind, message) when they do not fit its placeholders."""
        entries = record.get(self.cfg.image_key)
        if entries is None:
            entries = []
        elif not isinstance(entries, list):
            entries = [entries]  # one image stored bare
        placeholders = question.count(IMAGE_PLACEHOLDER)
        if placeholders != len(entries):
            return "image_count", (f"the question holds {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but field "
                                   f"{self.cfg.image_key!r} (data.image_key) holds {len(entries)} image(s); put one "
                                   f"{IMAGE_PLACEHOLDER} where each image goes")
        return None, entries

    def _add(self, where: str, record: dict[str, Any], counts: Counter,
             base_dir: Path = Path(".")) -> tuple[str | None, str | None]:
        """Validate one record; keep it, or return ``(kind, message)``."""
        cfg = self.cfg
        fields = sorted(record)[:12]
        for key, setting in ((cfg.question_key, "question_key"), (cfg.answer_key, "answer_key")):
            if key not in record:
                return "missing_field", f"missing field {key!r} (data.{setting}); the row has fields {fields}"
        question, answer = record[cfg.question_key], record[cfg.answer_key]
        if not isinstance(question, str):
            return "wrong_type", f"field {cfg.question_key!r} must be a string, got {_describe(question)}"
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            return "wrong_type", f"field {cfg.answer_key!r} must be a string or a number, got {_describe(answer)}"
        for key, value in ((cfg.question_key, question), (cfg.answer_key, answer)):
            if not value.strip():
                return "empty_field", f"field {key!r} is empty"
        solution = record.get(cfg.solution_key) if cfg.solution_key else None
        if solution is not None and not isinstance(solution, str):
            return "wrong_type", f"field {cfg.solution_key!r} must be a string or null, got {_describe(solution)}"
        entries: list[Any] = []
        image_counts: list[int] = []
        if self.images is not None:
            problem, found = self._image_entries(record, question)
            if problem is not None:
                return problem, found
            entries = found
            try:
                image_counts = self.images.check(entries, base_dir)
                length = len(self._student_ids(question, image_counts))
            except ImageError as exc:
                return "bad_image", str(exc)
        else:
            length = len(self._student_ids(question))
        if length > cfg.max_prompt_length:
            return "prompt_too_long", (f"the prompt is {length} tokens, over data.max_prompt_length="
                                       f"{cfg.max_prompt_length}")
        if cfg.solution_key and not (solution and solution.strip()):
            counts["rows_without_solution"] += 1
            solution = None
        self._rows.append((question, answer, solution, where, entries, base_dir))
        return None, None

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> PromptRow:
        question, answer, solution, source, entries, base_dir = self._rows[self._check_index(index)]
        if self.images is None or not entries:
            return PromptRow(index, question, answer, solution, self._student_ids(question), source)
        from rlsd_megatron.data.images import image_token_counts

        images = self.images.inputs(entries, base_dir)
        counts = image_token_counts(images.image_grid_thw, self.vision.spatial_merge_size)
        return PromptRow(index, question, answer, solution, self._student_ids(question, counts), source, images)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '…' if len(text) > 40 else text}"
