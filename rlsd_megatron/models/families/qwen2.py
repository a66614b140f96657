"""Qwen2 / Qwen2.5: the Llama layout with biases on the q/k/v projections."""

from __future__ import annotations

from typing import Any

from rlsd_megatron.config import ConfigError
from rlsd_megatron.models.families.llama_layout import LlamaLayoutFamily


class Qwen2(LlamaLayoutFamily):
    name = "qwen2"
    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"
    qkv_bias = True

    def refuse_hf(self, hf: dict[str, Any]) -> None:
        if hf.get("use_sliding_window"):
            raise ConfigError("model.hf_config: sliding-window attention (use_sliding_window=true) is not supported")
