"""Builds the train / validation prompt dataset from ``DataConfig``: a built-in task or files."""

from __future__ import annotations

from typing import Any

from rlsd_megatron.algorithms.teacher_context import RLSD_TEACHER_TEMPLATE
from rlsd_megatron.config import DataConfig
from rlsd_megatron.data.addition_prompts import ReversedAdditionPrompts
from rlsd_megatron.data.prompts import MATH_STUDENT_TEMPLATE, FilePromptDataset, PromptDataset
from rlsd_megatron.data.readers import DataError
from rlsd_megatron.data.tokenizer import load_chat_tokenizer

__all__ = ["BUILTIN_TASKS", "build_prompt_dataset"]

BUILTIN_TASKS = {"reversed_addition": ReversedAdditionPrompts}


def build_prompt_dataset(cfg: DataConfig, split: str = "train", *, tokenizer: Any = None,
                         student_template: str = MATH_STUDENT_TEMPLATE, system_prompt: str | None = None,
                         chat_template_kwargs: dict[str, Any] | None = None,
                         teacher_template: str = RLSD_TEACHER_TEMPLATE) -> PromptDataset | None:
    """The ``split`` (``train`` / ``val``) dataset; None for ``val`` when no ``data.val_files``.

    ``data.task`` selects a built-in task (then no files may be given); otherwise
    ``data.train_files`` / ``data.val_files`` are read with the tokenizer from
    ``data.tokenizer_dir`` (or ``tokenizer``, to share one already loaded). The keyword
    arguments are :class:`FilePromptDataset`'s.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} must be 'train' or 'val'.")
    if cfg.task is not None:
        if cfg.task not in BUILTIN_TASKS:
            raise DataError(f"data.task={cfg.task!r} is not a built-in task; known: {sorted(BUILTIN_TASKS)} "
                            "(or leave data.task unset and give data.train_files).")
        if cfg.train_files or cfg.val_files:
            raise DataError(f"data.task={cfg.task!r} and data.train_files/val_files are both set; use one.")
        return BUILTIN_TASKS[cfg.task](split)
    files = cfg.train_files if split == "train" else cfg.val_files
    if not files:
        if split == "val":
            return None
        raise DataError("no training data: set data.train_files (JSON Lines / JSON / Parquet) or data.task "
                        f"(one of {sorted(BUILTIN_TASKS)}).")
    return FilePromptDataset(files, cfg, tokenizer if tokenizer is not None else load_chat_tokenizer(cfg.tokenizer_dir),
                             student_template=student_template, system_prompt=system_prompt,
                             chat_template_kwargs=chat_template_kwargs, teacher_template=teacher_template)
