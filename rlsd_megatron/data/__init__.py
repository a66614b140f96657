"""Prompt data: file and built-in-task datasets behind one interface, and a resumable loader.

``build_prompt_dataset(cfg.data, "train")`` gives a :class:`PromptDataset`;
``PromptLoader(dataset, global_batch_size=..., dp_rank=..., dp_size=..., seed=cfg.train.seed,
shuffle=cfg.data.shuffle)`` draws this rank's rows of each global batch and saves / restores
its position; ``validation_rows`` shards a validation set. The self-teacher's context is built
by the trainer from a row with ``dataset.teacher_context`` (see :mod:`.prompts`).
"""

from rlsd_megatron.data.addition_prompts import ReversedAdditionPrompts
from rlsd_megatron.data.build import BUILTIN_TASKS, build_prompt_dataset, build_run_datasets
from rlsd_megatron.data.loader import PromptLoader, epoch_order, validation_rows
from rlsd_megatron.data.prompts import (BAD_ROW_KINDS, MATH_STUDENT_TEMPLATE, FilePromptDataset, PromptDataset,
                                        PromptRow)
from rlsd_megatron.data.readers import DataError, RawRow, read_rows
from rlsd_megatron.data.tokenizer import load_chat_tokenizer

__all__ = [
    "BAD_ROW_KINDS",
    "BUILTIN_TASKS",
    "DataError",
    "FilePromptDataset",
    "MATH_STUDENT_TEMPLATE",
    "PromptDataset",
    "PromptLoader",
    "PromptRow",
    "RawRow",
    "ReversedAdditionPrompts",
    "build_prompt_dataset",
    "build_run_datasets",
    "epoch_order",
    "load_chat_tokenizer",
    "read_rows",
    "validation_rows",
]
