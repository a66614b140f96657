"""Hugging Face `config.json` ⇄ `ModelConfig` for the supported families (Llama, Qwen2, Qwen3).

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

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_FAMILY_ARCH = {family: arch for arch, family in _ARCHITECTURES.items()}
# Megatron-core's Llama-3 RoPE scaling has these constants built in.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


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


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either transformers-4 or -5 style configs."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(theta), scaling


def model_fields_from_hf(source: str | Path | dict) -> dict[str, Any]:
    """`ModelConfig` field values for an HF config (a path or an already-loaded dict)."""
    hf = source if isinstance(source, dict) else read_hf_config(source)
    from rlsd_megatron.models.vision_config import is_vision_language, vision_language_fields

    if is_vision_language(hf):
        return vision_language_fields(hf, model_fields_from_hf)
    archs = hf.get("architectures") or []
    family = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
    if family is None:
        family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(hf.get("model_type", ""))
    if family is None:
        raise ConfigError(
            f"model.hf_config: architectures={archs} / model_type={hf.get('model_type')!r} is not supported; "
            f"supported: {sorted(_ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"model.hf_config: hidden_act={hf['hidden_act']!r}; only SwiGLU (silu) is supported")
    if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ConfigError("model.hf_config: Llama with attention_bias/mlp_bias is not supported (Megatron has QKV bias only)")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError("model.hf_config: sliding-window attention (use_sliding_window=true) is not supported")
    theta, scaling = _rope(hf)
    scaling_factor = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ConfigError(f"model.hf_config: rope scaling type {kind!r} is not supported (only llama3)")
        for key, value in _LLAMA3_ROPE_FIXED.items():
            if float(scaling.get(key, value)) != value:
                raise ConfigError(
                    f"model.hf_config: llama3 rope scaling with {key}={scaling[key]} is not supported; "
                    f"megatron-core fixes {key}={value}"
                )
        scaling_factor = float(scaling["factor"])
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return {
        "family": family,
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_query_groups": kv_heads if kv_heads != heads else None,
        "ffn_hidden_size": hf["intermediate_size"],
        "kv_channels": head_dim if head_dim * heads != hf["hidden_size"] or family == "qwen3" else None,
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "rope_theta": theta,
        "rope_scaling_factor": scaling_factor,
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "qkv_bias": family == "qwen2",
        "qk_layernorm": family == "qwen3",
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
    }


def head_dim(model: ModelConfig) -> int:
    return model.kv_channels or model.hidden_size // model.num_attention_heads


def hf_config_from_model(model: ModelConfig, **extra: Any) -> dict[str, Any]:
    """An HF `config.json` dict describing the same network as `model` (for transformers/SGLang)."""
    if model.family == "llama" and model.qkv_bias:
        raise ConfigError("model.qkv_bias=true has no Llama HF equivalent; use family qwen2")
    if model.family == "qwen2" and (not model.qkv_bias or model.qk_layernorm):
        raise ConfigError("family qwen2 means qkv_bias=true and qk_layernorm=false")
    if model.family == "qwen3" and (model.qkv_bias or not model.qk_layernorm):
        raise ConfigError("family qwen3 means qk_layernorm=true and qkv_bias=false")
    if model.family == "llama" and model.qk_layernorm:
        raise ConfigError("model.qk_layernorm=true has no Llama HF equivalent; use family qwen3")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": model.rope_theta}
    if model.rope_scaling_factor is not None:
        rope = {"rope_type": "llama3", "rope_theta": model.rope_theta, "factor": model.rope_scaling_factor,
                **_LLAMA3_ROPE_FIXED}
    config = {
        "architectures": [_FAMILY_ARCH[model.family]],
        "model_type": model.family,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups or model.num_attention_heads,
        "head_dim": head_dim(model),
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_parameters": rope,
        "tie_word_embeddings": model.tie_word_embeddings,
        "initializer_range": model.init_method_std,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    if model.family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if model.family == "qwen3":
        config["attention_bias"] = False
    config.update(extra)
    return config
