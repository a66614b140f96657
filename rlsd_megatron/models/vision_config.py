"""Qwen2.5-VL's and Qwen3-VL's HF `config.json` ⇄ our `ModelConfig` + `VisionConfig`, and the vision
tower's tensors.

A VL config is a text decoder (`text_config`; Qwen2.5-VL configs written by transformers 4 keep
those fields at the top level) plus a `vision_config` and the image placeholder token. What differs
between the two model types is one `VisionLanguageKind` (below): the text family that reads the
decoder (Qwen2 for Qwen2.5-VL, Qwen3 with q/k norm for Qwen3-VL), the vision fields, transformers'
tower class and whether M-RoPE's channels interleave over (t, h, w) (Qwen3-VL) or come in chunks.
The text part's rotary scaling entry is M-RoPE's `mrope_section`, which goes to `VisionConfig`.

The vision tower stays in HF's layout inside our model (`models.vision_language`), so its tensor
names and shapes are those of transformers' tower, listed here from a weightless (meta-device)
instance rather than from a second table that could drift.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rlsd_megatron.config import ConfigError, ModelConfig, VisionConfig

_COMMON_VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "in_channels",
                         "patch_size", "temporal_patch_size", "spatial_merge_size", "hidden_act")


@dataclass(frozen=True)
class VisionLanguageKind:
    """One HF vision-language model type: what our generic VL code needs to know about it."""

    model_type: str  # HF `model_type` (`VisionConfig.model_type`); its text / vision parts are `<it>_text` / `<it>_vision`
    architecture: str  # HF `architectures[0]`
    text_family: str  # our family of its language model (`models.families`)
    vision_fields: tuple[str, ...]  # `VisionConfig` fields that are HF `vision_config` keys
    tower_class: str  # transformers' vision tower class, in `transformers.models.<model_type>.modeling_<model_type>`
    vision_config_class: str  # its config class, in `...configuration_<model_type>`
    interleaved_mrope: bool  # M-RoPE channels cycle t, h, w (Qwen3-VL) instead of one chunk per axis (Qwen2.5-VL)
    # (transformers' module prefix, the prefix its checkpoint files use) where they differ: Qwen2.5-VL's
    # files keep transformers-4 names (`model.layers.`, `visual.`), which save_pretrained still writes.
    saved_prefixes: tuple[tuple[str, str], ...] = ()


VL_KINDS = {kind.model_type: kind for kind in (
    VisionLanguageKind("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2",
                       _COMMON_VISION_FIELDS + ("window_size", "fullatt_block_indexes"),
                       "Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLVisionConfig", interleaved_mrope=False,
                       saved_prefixes=(("model.language_model.", "model."), ("model.visual.", "visual."))),
    VisionLanguageKind("qwen3_vl", "Qwen3VLForConditionalGeneration", "qwen3",
                       _COMMON_VISION_FIELDS + ("num_position_embeddings", "deepstack_visual_indexes"),
                       "Qwen3VLVisionModel", "Qwen3VLVisionConfig", interleaved_mrope=True),
)}
# The HF tower's parameters under `model.visual.`; ours under `vision_model.` (models.vision_language).
HF_VISION_PREFIX = "model.visual."
VISION_PREFIX = "vision_model."


def vl_kind_of_hf(hf: dict) -> VisionLanguageKind | None:
    """The VL model type of an HF config dict (by `architectures`, else `model_type`); None: not VL."""
    for kind in VL_KINDS.values():
        if kind.architecture in (hf.get("architectures") or []):
            return kind
    return VL_KINDS.get(hf.get("model_type"))


def is_vision_language(hf: dict) -> bool:
    """Whether an HF config dict describes a vision-language model we read here."""
    return vl_kind_of_hf(hf) is not None


def vision_language_fields(hf: dict, text_fields: Callable[[dict], dict[str, Any]]) -> dict[str, Any]:
    """`ModelConfig` field values for a Qwen2.5-VL / Qwen3-VL config dict: `text_fields` (the
    text-model reader) on its decoder as its text family's, plus `vision` (a `VisionConfig` mapping)."""
    kind = vl_kind_of_hf(hf)
    if "vision_config" not in hf:
        raise ConfigError(f"model.hf_config: model_type {hf.get('model_type')!r} has no vision_config")
    text = dict(hf.get("text_config") or {k: v for k, v in hf.items() if k != "vision_config"})
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {})
    mrope_section = rope.pop("mrope_section", None)
    if mrope_section is None:
        raise ConfigError(f"model.hf_config: a {kind.model_type} config needs rope_parameters.mrope_section "
                          "(or rope_scaling.mrope_section) in its text config")
    if rope.get("mrope_interleaved", kind.interleaved_mrope) != kind.interleaved_mrope:
        raise ConfigError(f"model.hf_config: mrope_interleaved={rope['mrope_interleaved']} but transformers' "
                          f"{kind.model_type} always uses {kind.interleaved_mrope}")
    theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
    text.pop("rope_scaling", None)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    text_family = _text_family(kind)
    fields = text_fields({**text, "model_type": text_family.model_type, "architectures": [text_family.architecture]})
    head_dim = fields["kv_channels"] or fields["hidden_size"] // fields["num_attention_heads"]
    if 2 * sum(mrope_section) != head_dim:
        raise ConfigError(f"model.hf_config: mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    vision_hf = hf["vision_config"]
    vision = {name: vision_hf[name] for name in kind.vision_fields if name in vision_hf}
    if vision.get("out_hidden_size", fields["hidden_size"]) != fields["hidden_size"]:
        raise ConfigError(f"model.hf_config: vision_config.out_hidden_size={vision['out_hidden_size']} differs from "
                          f"the text hidden_size={fields['hidden_size']}")
    image_token_id = hf.get("image_token_id", text.get("image_token_id"))
    if image_token_id is None:
        raise ConfigError(f"model.hf_config: a {kind.model_type} config needs image_token_id")
    fields["vision"] = {**vision, "model_type": kind.model_type, "image_token_id": image_token_id,
                        "video_token_id": hf.get("video_token_id", text.get("video_token_id")),
                        "mrope_section": list(mrope_section)}
    return fields


def _text_family(kind: VisionLanguageKind):
    from rlsd_megatron.models.families import family_of

    return family_of(ModelConfig(family=kind.text_family))


def vl_kind(model: ModelConfig) -> VisionLanguageKind:
    """The VL model type of `model` (`model.vision.model_type`), after checking its decoder is that
    type's text family."""
    kind = VL_KINDS[model.vision.model_type]
    if model.family != kind.text_family:
        raise ConfigError(f"model.vision.model_type={kind.model_type} has a {kind.text_family} language model, "
                          f"got model.family={model.family}; set model.family={kind.text_family}")
    return kind


def saved_hf_name(model: ModelConfig, name: str) -> str:
    """The name an HF checkpoint file gives transformers' tensor `name` of `model` (what
    save_pretrained writes; the mapping's names are transformers' module names)."""
    for memory, saved in VL_KINDS[model.vision.model_type].saved_prefixes if model.vision is not None else ():
        if name.startswith(memory):
            return saved + name.removeprefix(memory)
    return name


def loaded_hf_name(model: ModelConfig, name: str) -> str:
    """transformers' module name of a checkpoint file's tensor `name` (inverse of `saved_hf_name`;
    names already in module form pass unchanged, so files of either layout load)."""
    prefixes = VL_KINDS[model.vision.model_type].saved_prefixes if model.vision is not None else ()
    if any(name.startswith(memory) for memory, _ in prefixes):
        return name
    for memory, saved in prefixes:
        if name.startswith(saved):
            return memory + name.removeprefix(saved)
    return name


def hf_vision_config(vision: VisionConfig) -> dict[str, Any]:
    """The HF `vision_config` dict of `vision` (the fields of its model type's vision config class)."""
    every = {
        "depth": vision.depth, "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
        "num_heads": vision.num_heads, "out_hidden_size": vision.out_hidden_size, "in_channels": vision.in_channels,
        "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
        "spatial_merge_size": vision.spatial_merge_size, "hidden_act": vision.hidden_act,
        "window_size": vision.window_size, "fullatt_block_indexes": list(vision.fullatt_block_indexes),
        "num_position_embeddings": vision.num_position_embeddings,
        "deepstack_visual_indexes": list(vision.deepstack_visual_indexes),
    }
    return {name: every[name] for name in VL_KINDS[vision.model_type].vision_fields}


def _transformers_class(model_type: str, module: str, name: str):
    return getattr(importlib.import_module(f"transformers.models.{model_type}.{module}_{model_type}"), name)


def build_vision_tower(vision: VisionConfig, *, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """transformers' vision tower of `vision.model_type` (patch embedding, ViT blocks, patch
    merger; Qwen3-VL's also DeepStack's mergers), initialised by transformers from the torch RNG."""
    kind = VL_KINDS[vision.model_type]
    config = _transformers_class(kind.model_type, "configuration", kind.vision_config_class)(**hf_vision_config(vision))
    config._attn_implementation = attn_implementation
    tower_class = _transformers_class(kind.model_type, "modeling", kind.tower_class)
    return tower_class._from_config(config, attn_implementation=attn_implementation)


def vision_tensor_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every vision-tower tensor of `model`, by its name inside the tower (HF's)."""
    with torch.device("meta"):
        tower = build_vision_tower(model.vision)
    return {name: tuple(param.shape) for name, param in tower.named_parameters()}


def vision_language_rules(text_rules: list, model: ModelConfig) -> list:
    """`TensorRule`s of a VL model: its text family's decoder rules with HF names under
    `model.language_model.` (the head stays `lm_head.weight`), then one copy per vision tensor."""
    from rlsd_megatron.models.families.base import TensorRule

    def language(name: str) -> str:
        return "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name

    rules = [TensorRule(r.megatron, tuple(language(n) for n in r.hf), r.hf_shapes, r.kind) for r in text_rules]
    rules += [TensorRule(VISION_PREFIX + name, (HF_VISION_PREFIX + name,), (tuple(shape),))
              for name, shape in vision_tensor_shapes(model).items()]
    return rules


def hf_vision_language_config(model: ModelConfig, text: dict[str, Any]) -> dict[str, Any]:
    """An HF Qwen2.5-VL / Qwen3-VL `config.json` dict describing the same network as `model`, whose
    decoder's text-model config is `text` (inverse of `vision_language_fields`; for transformers,
    the embedded engine and exports)."""
    kind = vl_kind(model)
    text = {k: v for k, v in text.items() if k != "architectures"}
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": list(model.vision.mrope_section)}
    if kind.interleaved_mrope:
        text["rope_parameters"]["mrope_interleaved"] = True
    text["model_type"] = f"{kind.model_type}_text"
    config = {
        "architectures": [kind.architecture],
        "model_type": kind.model_type,
        "text_config": text,
        "vision_config": {**hf_vision_config(model.vision), "model_type": f"{kind.model_type}_vision"},
        "image_token_id": model.vision.image_token_id,
        "tie_word_embeddings": model.tie_word_embeddings,
    }
    if model.vision.video_token_id is not None:
        config["video_token_id"] = model.vision.video_token_id
    return config
