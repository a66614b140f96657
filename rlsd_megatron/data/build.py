"""Builds the train / validation prompt dataset from ``DataConfig``: a built-in task or files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlsd_megatron.config import Config, DataConfig, VisionConfig
from rlsd_megatron.data.addition_prompts import ReversedAdditionPrompts
from rlsd_megatron.data.prompts import MATH_STUDENT_TEMPLATE, FilePromptDataset, PromptDataset
from rlsd_megatron.data.readers import SUPPORTED_SUFFIXES, DataError
from rlsd_megatron.data.teacher_context import RLSD_TEACHER_TEMPLATE
from rlsd_megatron.data.visual_addition import VisualReversedAdditionPrompts
from rlsd_megatron.data.tokenizer import check_tokenizer_dir, load_chat_tokenizer

__all__ = ["BUILTIN_TASKS", "build_prompt_dataset", "build_run_datasets", "data_input_problems"]

BUILTIN_TASKS = {"reversed_addition": ReversedAdditionPrompts, "visual_reversed_addition": VisualReversedAdditionPrompts}
VISION_TASKS = {"visual_reversed_addition"}  # built-in tasks whose prompts hold images (they take model.vision)


def build_prompt_dataset(cfg: DataConfig, split: str = "train", *, tokenizer: Any = None,
                         student_template: str = MATH_STUDENT_TEMPLATE, system_prompt: str | None = None,
                         chat_template_kwargs: dict[str, Any] | None = None,
                         teacher_template: str | None = None, vision: VisionConfig | None = None
                         ) -> PromptDataset | None:
    """The ``split`` (``train`` / ``val``) dataset; None for ``val`` when no ``data.val_files``.

    ``data.task`` selects a built-in task (then no files may be given); otherwise
    ``data.train_files`` / ``data.val_files`` are read with the tokenizer from
    ``data.tokenizer_dir`` (or ``tokenizer``, to share one already loaded). The keyword
    arguments are :class:`FilePromptDataset`'s; ``teacher_template`` None is the dataset's own
    wording (the spec's for files, a built-in task's for it); ``vision`` (``model.vision``) reads
    the files' images for a vision-language policy.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} must be 'train' or 'val'.")
    if cfg.task is not None:
        problem = _task_problem(cfg)
        if problem:
            raise DataError(problem)
        extra = {"vision": vision} if cfg.task in VISION_TASKS else {}
        return BUILTIN_TASKS[cfg.task](split, teacher_template=teacher_template, **extra)
    files = cfg.train_files if split == "train" else cfg.val_files
    if not files:
        if split == "val":
            return None
        raise DataError("no training data: set data.train_files (JSON Lines / JSON / Parquet) or data.task "
                        f"(one of {sorted(BUILTIN_TASKS)}).")
    return FilePromptDataset(files, cfg, tokenizer if tokenizer is not None else load_chat_tokenizer(cfg.tokenizer_dir),
                             student_template=student_template, system_prompt=system_prompt,
                             chat_template_kwargs=chat_template_kwargs,
                             teacher_template=teacher_template or RLSD_TEACHER_TEMPLATE, vision=vision)


def build_run_datasets(cfg: Config) -> tuple[PromptDataset, PromptDataset | None]:
    """A run's training and validation datasets: ``cfg.data``, with the teacher's wording from
    ``algorithm.teacher_template`` (checked at start-up by ``config_checks``) and the images of a
    vision-language ``model.vision``."""
    teacher_template, vision = cfg.algorithm.teacher_template, cfg.model.vision
    return (build_prompt_dataset(cfg.data, "train", teacher_template=teacher_template, vision=vision),
            build_prompt_dataset(cfg.data, "val", teacher_template=teacher_template, vision=vision))


def data_input_problems(cfg: DataConfig) -> list[str]:
    """What :func:`build_prompt_dataset` would refuse that a glance at the file system shows: an
    unknown task, no training data, data files that are missing or of an unknown kind, an unset
    or empty ``data.tokenizer_dir``. Reads no rows and loads no tokenizer (cheap), so the trainer
    reports these before it builds the model; row problems are found when the dataset is built."""
    if cfg.task is not None:
        problem = _task_problem(cfg)
        return [problem] if problem else []
    if not cfg.train_files:
        return [f"no training data: set data.train_files (JSON Lines / JSON / Parquet) or data.task (one of "
                f"{sorted(BUILTIN_TASKS)})."]
    problems = []
    for key, files in (("train_files", cfg.train_files), ("val_files", cfg.val_files)):
        for i, name in enumerate(files):
            path = Path(name)
            where = f"data.{key}[{i}]={name!r}"
            if path.is_dir():
                problems.append(f"{where} is a directory, not a file; list the files in it, e.g. "
                                f"data.{key}=[{path / ('train' if key == 'train_files' else 'val')}.parquet].")
            elif not path.is_file():
                relative = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
                problems.append(f"{where} does not exist{relative}; give the path of a .jsonl, .json or .parquet "
                                "file that every node can read.")
            elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
                problems.append(f"{where} has suffix {path.suffix!r}; supported: {list(SUPPORTED_SUFFIXES)} "
                                "(convert it, e.g. with pandas.DataFrame.to_parquet).")
    try:
        check_tokenizer_dir(cfg.tokenizer_dir)
    except DataError as exc:
        problems.append(str(exc))
    return problems


def _task_problem(cfg: DataConfig) -> str | None:
    if cfg.task not in BUILTIN_TASKS:
        return (f"data.task={cfg.task!r} is not a built-in task; known: {sorted(BUILTIN_TASKS)} "
                "(or leave data.task unset and give data.train_files).")
    if cfg.train_files or cfg.val_files:
        return f"data.task={cfg.task!r} and data.train_files/val_files are both set; use one."
    return None
