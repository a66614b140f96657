"""Qwen2.5-VL's HF `config.json` ⇄ our `ModelConfig` + `VisionConfig`, and the vision tower's tensors.

A Qwen2.5-VL config (model_type `qwen2_5_vl`) is a Qwen2 text decoder (`text_config`; configs
written by transformers 4 keep those fields at the top level) plus a `vision_config` and the image
placeholder token. The text part is read by `hf_config.model_fields_from_hf` as a Qwen2 decoder;
its rotary scaling entry is M-RoPE's `mrope_section`, which goes to `VisionConfig`.

The vision tower stays in HF's layout inside our model (`models.vision_language`), so its tensor
names and shapes are those of transformers' `Qwen2_5_VisionTransformerPretrainedModel`, listed
here from a weightless (meta-device) instance rather than from a second table that could drift.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from rlsd_megatron.config import ConfigError, ModelConfig, VisionConfig

VL_MODEL_TYPES = {"qwen2_5_vl"}
VL_ARCHITECTURES = {"Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}
# The HF tower's parameters under `model.visual.`; ours under `vision_model.` (models.vision_language).
HF_VISION_PREFIX = "model.visual."
VISION_PREFIX = "vision_model."
_VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "in_channels",
                  "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size",
                  "fullatt_block_indexes", "hidden_act")


def is_vision_language(hf: dict) -> bool:
    """Whether an HF config dict describes a vision-language model we read here."""
    return hf.get("model_type") in VL_MODEL_TYPES or any(a in VL_ARCHITECTURES for a in hf.get("architectures") or [])


def vision_language_fields(hf: dict, text_fields: Callable[[dict], dict[str, Any]]) -> dict[str, Any]:
    """`ModelConfig` field values for a Qwen2.5-VL config dict: `text_fields` (the text-model
    reader) on its Qwen2 decoder, plus `vision` (a `VisionConfig` field mapping)."""
    if "vision_config" not in hf:
        raise ConfigError(f"model.hf_config: model_type {hf.get('model_type')!r} has no vision_config")
    text = dict(hf.get("text_config") or {k: v for k, v in hf.items() if k != "vision_config"})
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {})
    mrope_section = rope.pop("mrope_section", None)
    if mrope_section is None:
        raise ConfigError("model.hf_config: a Qwen2.5-VL config needs rope_parameters.mrope_section "
                          "(or rope_scaling.mrope_section) in its text config")
    theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
    text.pop("rope_scaling", None)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    fields = text_fields({**text, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    head_dim = fields["kv_channels"] or fields["hidden_size"] // fields["num_attention_heads"]
    if 2 * sum(mrope_section) != head_dim:
        raise ConfigError(f"model.hf_config: mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    vision_hf = hf["vision_config"]
    vision = {name: vision_hf[name] for name in _VISION_FIELDS if name in vision_hf}
    if vision.get("out_hidden_size", fields["hidden_size"]) != fields["hidden_size"]:
        raise ConfigError(f"model.hf_config: vision_config.out_hidden_size={vision['out_hidden_size']} differs from "
                          f"the text hidden_size={fields['hidden_size']}")
    image_token_id = hf.get("image_token_id", text.get("image_token_id"))
    if image_token_id is None:
        raise ConfigError("model.hf_config: a Qwen2.5-VL config needs image_token_id")
    fields["vision"] = {**vision, "image_token_id": image_token_id, "mrope_section": list(mrope_section)}
    return fields


def hf_vision_config(vision: VisionConfig) -> dict[str, Any]:
    """The HF `vision_config` dict of `vision` (transformers' Qwen2_5_VLVisionConfig fields)."""
    return {
        "depth": vision.depth, "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
        "num_heads": vision.num_heads, "out_hidden_size": vision.out_hidden_size, "in_channels": vision.in_channels,
        "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
        "spatial_merge_size": vision.spatial_merge_size, "window_size": vision.window_size,
        "fullatt_block_indexes": list(vision.fullatt_block_indexes), "hidden_act": vision.hidden_act,
    }


def build_vision_tower(vision: VisionConfig, *, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """transformers' Qwen2.5-VL vision tower (patch embedding, windowed ViT blocks, patch merger)
    for `vision`, initialised by transformers from the current torch RNG."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = Qwen2_5_VLVisionConfig(**hf_vision_config(vision))
    config._attn_implementation = attn_implementation
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation=attn_implementation)


def vision_tensor_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every vision-tower tensor of `model`, by its name inside the tower (HF's)."""
    with torch.device("meta"):
        tower = build_vision_tower(model.vision)
    return {name: tuple(param.shape) for name, param in tower.named_parameters()}


def vision_language_rules(text_rules: list, model: ModelConfig) -> list:
    """`TensorRule`s of a Qwen2.5-VL model: the Qwen2 decoder's rules with HF names under
    `model.language_model.` (the head stays `lm_head.weight`), then one copy per vision tensor."""
    from rlsd_megatron.models.families.base import TensorRule

    def language(name: str) -> str:
        return "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name

    rules = [TensorRule(r.megatron, tuple(language(n) for n in r.hf), r.hf_shapes, r.kind) for r in text_rules]
    rules += [TensorRule(VISION_PREFIX + name, (HF_VISION_PREFIX + name,), (tuple(shape),))
              for name, shape in vision_tensor_shapes(model).items()]
    return rules


def hf_vision_language_config(model: ModelConfig) -> dict[str, Any]:
    """An HF Qwen2.5-VL `config.json` dict describing the same network as `model` (inverse of
    `vision_language_fields`; for transformers, the embedded engine and exports)."""
    from rlsd_megatron.models.hf_config import hf_config_from_model

    text = hf_config_from_model(model)
    text.pop("architectures")
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": list(model.vision.mrope_section)}
    text["model_type"] = "qwen2_5_vl_text"
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "vision_config": {**hf_vision_config(model.vision), "model_type": "qwen2_5_vl_vision"},
        "image_token_id": model.vision.image_token_id,
        "tie_word_embeddings": model.tie_word_embeddings,
    }
