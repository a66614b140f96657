"""Qwen3 (dense): the Llama layout with RMSNorm on each head's q and k and an explicit head dim."""

from __future__ import annotations

from rlsd_megatron.models.families.llama_layout import LlamaLayoutFamily


class Qwen3(LlamaLayoutFamily):
    name = "qwen3"
    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    qk_layernorm = True
    explicit_head_dim = True
    hf_flags = {"attention_bias": False}
