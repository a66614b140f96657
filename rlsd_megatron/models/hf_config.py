"""Hugging Face `config.json` ⇄ `ModelConfig`, asking the model's family (`models.families`).

The single translation of architecture hyper-parameters between the two worlds, used by the
config loader (`model.hf_config`), the embedded rollout engine and the checkpoint converters.
Anything in an HF config that our Megatron model cannot reproduce exactly raises a ConfigError
rather than being silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlsd_megatron.config import ConfigError, ModelConfig
from rlsd_megatron.models.families import family_for_hf, family_of
from rlsd_megatron.models.families.llama_layout import head_dim

__all__ = ["read_hf_config", "model_fields_from_hf", "hf_config_from_model", "head_dim"]


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Load `config.json` from a model directory or a direct path."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"model.hf_config: no config.json at {str(file)!r}; point it at the Hugging Face model "
                          "directory (or its config.json) that the checkpoint was converted from")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model.hf_config: {file} is not valid JSON ({exc})") from None


def model_fields_from_hf(source: str | Path | dict) -> dict[str, Any]:
    """`ModelConfig` field values for an HF config (a path or an already-loaded dict)."""
    hf = source if isinstance(source, dict) else read_hf_config(source)
    from rlsd_megatron.models.vision_config import is_vision_language, vision_language_fields

    if is_vision_language(hf):
        return vision_language_fields(hf, model_fields_from_hf)
    return family_for_hf(hf).fields_from_hf(hf)


def hf_config_from_model(model: ModelConfig, **extra: Any) -> dict[str, Any]:
    """An HF `config.json` dict describing the same network as `model` (for transformers/SGLang);
    `extra` keys are added or override. A vision-language model's is its VL config (the decoder's
    under `text_config`)."""
    config = family_of(model).hf_config(model)
    if model.vision is not None:
        from rlsd_megatron.models.vision_config import hf_vision_language_config

        config = hf_vision_language_config(model, config)
    return {**config, **extra}
