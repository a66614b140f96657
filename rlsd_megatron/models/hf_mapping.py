"""Canonical Megatron tensors ⇄ Hugging Face tensors, by the rules of the model's family.

Used in both directions by the checkpoint converters and the rollout weight sync (the Megatron
side is the canonical, TP=1/PP=1 unpadded layout of `models.sharding`). Each family states its
rules (`models.families`: which HF tensor(s) each Megatron tensor is, their shapes and how they
combine: `copy`, `qkv` or `gate_up`); this module applies them. Every tensor is converted on its
own, so both directions stream with memory bounded by a few tensors.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import torch

from rlsd_megatron.config import ModelConfig
from rlsd_megatron.models.families import TensorRule, family_of
from rlsd_megatron.models.hf_config import head_dim


def family_rules(model: ModelConfig) -> list[TensorRule]:
    """The tensor rules of `model`'s family and options (untied head, QKV bias, q/k norm), and a
    vision-language model's vision tower."""
    rules = family_of(model).tensor_rules(model)
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
    shapes = {}
    for rule in family_rules(model):
        for _, hf_names in _expand(rule, model.num_layers):
            shapes.update(zip(hf_names, rule.hf_shapes))
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
    ignorable = family_of(model).ignorable_hf_names(model, hf_names)
    unknown = sorted(hf_names - expected - ignorable)
    missing = sorted(expected - hf_names)
    if unknown or missing:
        raise MappingError(
            f"HF checkpoint does not match the {model.family} config: "
            + (f"unexpected tensors {unknown[:5]}{'…' if len(unknown) > 5 else ''}; " if unknown else "")
            + (f"missing tensors {missing[:5]}{'…' if len(missing) > 5 else ''}" if missing else "")
        )
