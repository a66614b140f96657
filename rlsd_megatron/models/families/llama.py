"""Llama (Llama 2 / 3 / 3.1 / 3.2, SmolLM2, ...): the plain Llama layout."""

from __future__ import annotations

from typing import Any

from rlsd_megatron.config import ConfigError
from rlsd_megatron.models.families.llama_layout import LlamaLayoutFamily


class Llama(LlamaLayoutFamily):
    name = "llama"
    architecture = "LlamaForCausalLM"
    model_type = "llama"
    hf_flags = {"attention_bias": False, "mlp_bias": False}

    def refuse_hf(self, hf: dict[str, Any]) -> None:
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError("model.hf_config: Llama with attention_bias/mlp_bias is not supported "
                              "(Megatron has QKV bias only)")
