"""The one table of floating-point storage types and their names in each place they are written.

Our short names (`fp32`, `bf16`, `fp16`) are what `precision.params_dtype`, the converters'
`--dtype` and a checkpoint's `rlsd_checkpoint.json` (`params_dtype`) say; Hugging Face's
config.json (`torch_dtype`) and SGLang's `dtype` spell them `float32`/`bfloat16`/`float16`;
a safetensors header says `F32`/`BF16`/`F16`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatType:
    """One storage type under each of its names, and its size."""

    name: str  # ours: precision.params_dtype, --dtype, rlsd_checkpoint.json
    torch_dtype: torch.dtype
    hf_name: str  # config.json's torch_dtype, SGLang's dtype
    safetensors_code: str  # a safetensors header's dtype
    bytes_per_element: int


FLOAT_TYPES: dict[str, FloatType] = {
    t.name: t
    for t in (
        FloatType("fp32", torch.float32, "float32", "F32", 4),
        FloatType("bf16", torch.bfloat16, "bfloat16", "BF16", 2),
        FloatType("fp16", torch.float16, "float16", "F16", 2),
    )
}
_BY_TORCH = {t.torch_dtype: t for t in FLOAT_TYPES.values()}
_BY_SAFETENSORS = {t.safetensors_code: t for t in FLOAT_TYPES.values()}


def float_type(name: str) -> FloatType:
    """The entry for our short name `name` (fp32, bf16, fp16)."""
    if name not in FLOAT_TYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(FLOAT_TYPES)}")
    return FLOAT_TYPES[name]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of our short name, e.g. torch.bfloat16 for 'bf16'."""
    return float_type(name).torch_dtype


def bytes_per_element(name: str) -> int:
    """Bytes one element of our short name's type takes (4 for fp32, 2 for bf16/fp16)."""
    return float_type(name).bytes_per_element


def of_torch(dtype: torch.dtype) -> FloatType | None:
    """The entry of a torch dtype; None for a type outside the table (e.g. float64, fp8)."""
    return _BY_TORCH.get(dtype)


def of_safetensors(code: str) -> FloatType | None:
    """The entry of a safetensors header dtype code ('BF16'); None for one outside the table."""
    return _BY_SAFETENSORS.get(code)


def dtype_name(dtype: torch.dtype) -> str:
    """Our short name of a torch dtype ('bf16'); `str(dtype)` for one outside the table."""
    entry = _BY_TORCH.get(dtype)
    return entry.name if entry else str(dtype)
