"""Silence known, harmless start-up noise from megatron-core and torch (and nothing else).

Each entry is a message we have read and judged irrelevant to our use; anything new still
shows. Call `quiet_known_noise()` before importing megatron-core.
"""

from __future__ import annotations

import logging
import re
import warnings

_WARNINGS = (
    # No TE / apex on CPU: megatron falls back to torch implementations, which is what we want.
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"MimoModelConfig is experimental",
    r"full scope is deprecated",
    # Pipeline schedules probe `.grad` of activation tensors; harmless.
    r"The \.grad attribute of a Tensor that is not a leaf Tensor",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\._all_gather_base` is a private function",
    r"No CUDA runtime is found",
    # Reading a checkpoint in one process (rlsd-eval, the converters) through torch.distributed.checkpoint.
    r"The argument order of load has been changed",
    r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single",
)
# The synchronous torch_dist save goes through the async code path with its "mcore" strategy,
# which warns once; we never save asynchronously.
_LOG_MESSAGES = re.compile(r"GPTModel IS DEPRECATED|full_param_layout not provided|MCore's async save is deprecated")


class _DropKnown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _LOG_MESSAGES.search(record.getMessage())


def quiet_known_noise() -> None:
    for pattern in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Logger filters do not see records propagated from child loggers; handler filters do.
    # Megatron logs through the root logger's handlers, or Python's last-resort handler.
    for handler in [*logging.getLogger().handlers, logging.lastResort]:
        if handler is not None:
            handler.addFilter(_DropKnown())
    # torch logs this at import through its own handler; it only says the CPU build has no CUDA.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
