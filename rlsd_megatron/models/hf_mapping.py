"""Canonical Megatron GPT tensors ⇄ Hugging Face Llama / Qwen2 / Qwen3 tensors.

One declarative table of rules per family, used in both directions by the checkpoint converters
and the rollout weight sync (the Megatron side is the canonical, TP=1/PP=1 unpadded layout of
`models.sharding`). Two rules are more than a rename:

- `qkv`: Megatron fuses Q, K and V into `linear_qkv` grouped by KV group: for each of the G
  groups, its H/G query heads, then its key head, then its value head (rows of head_dim each).
  HF keeps separate `q_proj` / `k_proj` / `v_proj`.
- `gate_up`: Megatron's SwiGLU `linear_fc1` is [gate; up] stacked on rows; HF has `gate_proj` and
  `up_proj`.
Every tensor is converted on its own, so both directions stream with memory bounded by a few
tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Mapping

import torch

from rlsd_megatron.config import ModelConfig
from rlsd_megatron.models.hf_config import head_dim


@dataclass(frozen=True)
class TensorRule:
    megatron: str  # canonical Megatron name; "{i}" is the layer index
    hf: tuple[str, ...]  # HF name(s) it corresponds to
    kind: Literal["copy", "qkv", "gate_up"] = "copy"


def family_rules(model: ModelConfig) -> list[TensorRule]:
    """The rules of `model`'s family and options (untied head, QKV bias, q/k norm)."""
    attn = "model.layers.{i}.self_attn"
    rules = [
        TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        TensorRule("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",)),
        TensorRule("decoder.layers.{i}.self_attention.linear_qkv.weight",
                   (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"), "qkv"),
        TensorRule("decoder.layers.{i}.self_attention.linear_proj.weight", (f"{attn}.o_proj.weight",)),
        TensorRule("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
        TensorRule("decoder.layers.{i}.mlp.linear_fc1.weight",
                   ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "gate_up"),
        TensorRule("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
        TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if model.qkv_bias:
        rules.append(TensorRule("decoder.layers.{i}.self_attention.linear_qkv.bias",
                                (f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"), "qkv"))
    if model.qk_layernorm:
        rules.append(TensorRule("decoder.layers.{i}.self_attention.q_layernorm.weight", (f"{attn}.q_norm.weight",)))
        rules.append(TensorRule("decoder.layers.{i}.self_attention.k_layernorm.weight", (f"{attn}.k_norm.weight",)))
    if not model.tie_word_embeddings:
        rules.append(TensorRule("output_layer.weight", ("lm_head.weight",)))
    if model.vision is not None:
        from rlsd_megatron.models.vision_config import vision_language_rules

        rules = vision_language_rules(rules, model)
    return rules


def _expand(rule: TensorRule, num_layers: int) -> Iterator[tuple[str, tuple[str, ...]]]:
    if "{i}" not in rule.megatron:
        yield rule.megatron, rule.hf
        return
    for i in range(num_layers):
        yield rule.megatron.format(i=i), tuple(name.format(i=i) for name in rule.hf)


def name_pairs(model: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """Every (Megatron name, HF names, kind) of the model, in checkpoint order."""
    return [(meg, hf, rule.kind) for rule in family_rules(model) for meg, hf in _expand(rule, model.num_layers)]


def _qkv_sizes(model: ModelConfig) -> tuple[int, int, int]:
    groups = model.num_query_groups or model.num_attention_heads
    return groups, model.num_attention_heads // groups, head_dim(model)


def split_qkv(fused: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped `linear_qkv` rows (weight [rows, hidden] or bias [rows]) → q, k, v."""
    groups, per_group, dim = _qkv_sizes(model)
    grouped = fused.reshape(groups, per_group + 2, dim, *fused.shape[1:])
    q = grouped[:, :per_group].reshape(groups * per_group * dim, *fused.shape[1:])
    k = grouped[:, per_group].reshape(groups * dim, *fused.shape[1:])
    v = grouped[:, per_group + 1].reshape(groups * dim, *fused.shape[1:])
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    groups, per_group, dim = _qkv_sizes(model)
    trailing = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(groups, per_group, dim, *trailing), k.reshape(groups, 1, dim, *trailing),
         v.reshape(groups, 1, dim, *trailing)],
        dim=1,
    )
    return grouped.reshape(groups * (per_group + 2) * dim, *trailing)


def expected_hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor of `model` (for validating checkpoints before converting)."""
    groups, per_group, dim = _qkv_sizes(model)
    h, f, v = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    by_suffix = {
        "embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "q_proj.weight": (groups * per_group * dim, h), "k_proj.weight": (groups * dim, h),
        "v_proj.weight": (groups * dim, h), "q_proj.bias": (groups * per_group * dim,),
        "k_proj.bias": (groups * dim,), "v_proj.bias": (groups * dim,),
        "o_proj.weight": (h, groups * per_group * dim), "q_norm.weight": (dim,), "k_norm.weight": (dim,),
        "gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f),
    }
    shapes = {}
    if model.vision is not None:
        from rlsd_megatron.models.vision_config import HF_VISION_PREFIX, vision_tensor_shapes

        shapes = {HF_VISION_PREFIX + name: shape for name, shape in vision_tensor_shapes(model).items()}
    for _, hf_names, _ in name_pairs(model):
        for name in hf_names:
            if name in shapes:
                continue
            suffix = max((s for s in by_suffix if name == s or name.endswith("." + s)), key=len)
            shapes[name] = by_suffix[suffix]
    return shapes


def megatron_to_hf(name: str, tensor: torch.Tensor, model: ModelConfig,
                   kinds: Mapping[str, tuple[tuple[str, ...], str]] | None = None) -> list[tuple[str, torch.Tensor]]:
    """One canonical Megatron tensor → its HF tensor(s). Unknown names raise KeyError."""
    kinds = kinds or {meg: (hf, kind) for meg, hf, kind in name_pairs(model)}
    if name not in kinds:
        raise KeyError(f"Megatron tensor {name!r} has no HF mapping for family {model.family}")
    hf_names, kind = kinds[name]
    if kind == "qkv":
        return list(zip(hf_names, split_qkv(tensor, model)))
    if kind == "gate_up":
        return list(zip(hf_names, torch.chunk(tensor, 2, dim=0)))
    return [(hf_names[0], tensor)]


class MappingError(ValueError):
    """A checkpoint does not match the model it is converted for."""


def hf_to_megatron(get_hf: Callable[[str], torch.Tensor], model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical Megatron tensors from HF tensors fetched one by one with `get_hf(name)` (e.g.
    from a safetensors file), validating every shape against the model config."""
    shapes = expected_hf_shapes(model)
    for meg_name, hf_names, kind in name_pairs(model):
        parts = []
        for hf_name in hf_names:
            try:
                tensor = get_hf(hf_name)
            except KeyError:
                raise MappingError(f"HF checkpoint has no tensor {hf_name!r} (needed for {meg_name})") from None
            if tuple(tensor.shape) != shapes[hf_name]:
                raise MappingError(
                    f"HF tensor {hf_name!r} has shape {tuple(tensor.shape)}, the model config implies {shapes[hf_name]}"
                )
            parts.append(tensor)
        if kind == "qkv":
            yield meg_name, fuse_qkv(*parts, model)
        elif kind == "gate_up":
            yield meg_name, torch.cat(parts, dim=0)
        else:
            yield meg_name, parts[0]


def check_hf_names(hf_names: set[str], model: ModelConfig) -> None:
    """Raise if an HF checkpoint has tensors the model would silently ignore, or lacks some."""
    expected = set(expected_hf_shapes(model))
    ignorable = {n for n in hf_names if n.endswith("rotary_emb.inv_freq")}
    if model.tie_word_embeddings:
        ignorable |= {"lm_head.weight"} & hf_names  # some tied checkpoints store the copy
    unknown = sorted(hf_names - expected - ignorable)
    missing = sorted(expected - hf_names)
    if unknown or missing:
        raise MappingError(
            f"HF checkpoint does not match the {model.family} config: "
            + (f"unexpected tensors {unknown[:5]}{'…' if len(unknown) > 5 else ''}; " if unknown else "")
            + (f"missing tensors {missing[:5]}{'…' if len(missing) > 5 else ''}" if missing else "")
        )
