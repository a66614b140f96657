"""What a model family must tell the generic model code: the `ModelFamily` interface.

A family (Llama, Qwen2, Qwen3, ...) is everything that differs between architectures: how its
Hugging Face `config.json` translates to our `ModelConfig`, which megatron-core options build it
(QKV bias, q/k norm, ...), and which HF tensor each Megatron tensor is. The generic code
(`models.hf_config`, `models.hf_mapping`, `models.provider`, the converters, weight sync) asks
the family through this interface and never branches on a family name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from rlsd_megatron.config import ModelConfig


@dataclass(frozen=True)
class TensorRule:
    """One Megatron tensor and the HF tensor(s) it is, for one model config.

    `kind` says how the HF parts combine into the Megatron tensor: `copy` (one part, the same
    tensor), `qkv` (q, k, v fused grouped by KV group, `hf_mapping.fuse_qkv`) or `gate_up`
    (SwiGLU's gate and up stacked on rows). `hf_shapes` are the HF parts' shapes, in `hf` order.
    """

    megatron: str  # canonical Megatron name; "{i}" is the layer index
    hf: tuple[str, ...]  # HF name(s) it corresponds to; "{i}" as above
    hf_shapes: tuple[tuple[int, ...], ...]
    kind: Literal["copy", "qkv", "gate_up"] = "copy"


class ModelFamily(ABC):
    """One model family. Subclasses set the class attributes and implement the methods."""

    name: str  # `ModelConfig.family`
    architecture: str  # HF `architectures[0]`
    model_type: str  # HF `model_type`

    @abstractmethod
    def fields_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        """`ModelConfig` field values for an HF config dict of this family; raises ConfigError
        on anything our Megatron model cannot reproduce exactly."""

    @abstractmethod
    def hf_config(self, model: ModelConfig) -> dict[str, Any]:
        """An HF `config.json` dict describing the same network as `model`."""

    @abstractmethod
    def transformer_options(self, model: ModelConfig) -> dict[str, Any]:
        """The family's megatron-core `TransformerConfig` options for `model` (QKV bias, q/k
        norm, ...), on top of the shared decoder settings of `models.provider`."""

    @abstractmethod
    def ignorable_hf_names(self, model: ModelConfig, hf_names: set[str]) -> set[str]:
        """Names among `hf_names` (an HF checkpoint's) that carry nothing the model needs
        (buffers, copies of tied weights): not reported as unexpected."""

    @abstractmethod
    def tensor_rules(self, model: ModelConfig) -> list[TensorRule]:
        """Every Megatron ⇄ HF tensor rule of `model`, in checkpoint order."""
