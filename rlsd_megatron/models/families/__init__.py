"""The model families we can build, convert and sync, one module each, registered here.

Adding a family = a module with a `ModelFamily` subclass (`base.py`; a Llama-style dense decoder
subclasses `llama_layout.LlamaLayoutFamily` and sets a few attributes), one line in `_FAMILIES`,
its name in `ModelConfig.family`, and its tests (a tiny random HF model in `tests/hf_models.py`
runs it through the mapping, converter and parity tests).
"""

from __future__ import annotations

from typing import Any

from rlsd_megatron.config import ConfigError, ModelConfig
from rlsd_megatron.models.families.base import ModelFamily, TensorRule
from rlsd_megatron.models.families.llama import Llama
from rlsd_megatron.models.families.qwen2 import Qwen2
from rlsd_megatron.models.families.qwen2_moe import Qwen2Moe
from rlsd_megatron.models.families.qwen3 import Qwen3
from rlsd_megatron.models.families.qwen3_moe import Qwen3Moe

__all__ = ["ModelFamily", "TensorRule", "family_of", "family_for_hf", "supported_families"]

_FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (Llama(), Qwen2(), Qwen3(), Qwen3Moe(), Qwen2Moe())}


def supported_families() -> list[str]:
    """Names of the registered families (`ModelConfig.family` values)."""
    return sorted(_FAMILIES)


def family_of(model: ModelConfig) -> ModelFamily:
    """The family `model` belongs to (by `model.family`)."""
    try:
        return _FAMILIES[model.family]
    except KeyError:
        raise ConfigError(f"model.family={model.family!r} is not supported; supported: {supported_families()}") from None


def family_for_hf(hf: dict[str, Any]) -> ModelFamily:
    """The family of an HF config dict: by `architectures`, else by `model_type`."""
    archs = hf.get("architectures") or []
    by_architecture = {family.architecture: family for family in _FAMILIES.values()}
    by_model_type = {family.model_type: family for family in _FAMILIES.values()}
    family = next((by_architecture[a] for a in archs if a in by_architecture), None)
    family = family or by_model_type.get(hf.get("model_type", ""))
    if family is not None:
        return family
    raise ConfigError(
        f"model.hf_config: architectures={archs} / model_type={hf.get('model_type')!r} is not supported; "
        f"supported: {sorted(f.architecture for f in _FAMILIES.values())} "
        f"(model_type {sorted(f.model_type for f in _FAMILIES.values())})"
    )
