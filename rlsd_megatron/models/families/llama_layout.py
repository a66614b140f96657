"""The Llama-style dense decoder shared by Llama, Qwen2 and Qwen3, written once.

Pre-norm RMSNorm layers of grouped-query attention with rotary embeddings and a SwiGLU MLP, no
linear biases; the families differ only in QKV bias (Qwen2), q/k RMSNorm with an explicit head
dim (Qwen3) and the HF configs they accept. A family sharing this layout is a `LlamaLayoutFamily`
with its names, those two options and, if it has any, `refuse_hf` for HF features it lacks.

Two tensor rules are more than a rename:
- `qkv`: Megatron fuses Q, K and V into `linear_qkv` grouped by KV group: for each of the G
  groups, its H/G query heads, then its key head, then its value head (rows of head_dim each).
  HF keeps separate `q_proj` / `k_proj` / `v_proj`.
- `gate_up`: Megatron's SwiGLU `linear_fc1` is [gate; up] stacked on rows; HF has `gate_proj` and
  `up_proj`.
"""

from __future__ import annotations

from typing import Any

from rlsd_megatron.config import ConfigError, ModelConfig
from rlsd_megatron.models.families.base import ModelFamily, TensorRule

# Megatron-core's Llama-3 RoPE scaling has these constants built in.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def head_dim(model: ModelConfig) -> int:
    """Channels per attention head: `kv_channels`, else hidden_size / heads."""
    return model.kv_channels or model.hidden_size // model.num_attention_heads


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either transformers-4 or -5 style configs."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(theta), scaling


def _rope_scaling_factor(scaling: dict | None) -> float | None:
    """Llama-3 RoPE scaling factor, refusing scalings megatron-core cannot reproduce."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ConfigError(f"model.hf_config: rope scaling type {kind!r} is not supported (only llama3)")
    for key, value in LLAMA3_ROPE_FIXED.items():
        if float(scaling.get(key, value)) != value:
            raise ConfigError(
                f"model.hf_config: llama3 rope scaling with {key}={scaling[key]} is not supported; "
                f"megatron-core fixes {key}={value}"
            )
    return float(scaling["factor"])


class LlamaLayoutFamily(ModelFamily):
    """A family with the Llama layout; subclasses set the names and the two options."""

    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2)
    qk_layernorm: bool = False  # RMSNorm on each head's q and k (Qwen3)
    # HF head_dim is part of the architecture (written even when it is hidden / heads) (Qwen3)
    explicit_head_dim: bool = False
    hf_flags: dict[str, Any] = {}  # config.json keys of the family's HF class saying "no such feature"
    moe: bool = False  # routed experts in every layer's MLP (`model.num_experts`) instead of a dense one
    shared_expert: bool = False  # a gated shared expert beside the routed ones (Qwen2-MoE)

    def refuse_hf(self, hf: dict[str, Any]) -> None:
        """Raise ConfigError for HF features of this family the layout cannot reproduce."""

    def fields_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"model.hf_config: hidden_act={hf['hidden_act']!r}; only SwiGLU (silu) is supported")
        self.refuse_hf(hf)
        theta, scaling = _rope(hf)
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return {
            "family": self.name,
            "vocab_size": hf["vocab_size"],
            "hidden_size": hf["hidden_size"],
            "num_layers": hf["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_query_groups": kv_heads if kv_heads != heads else None,
            "ffn_hidden_size": hf["intermediate_size"],
            "kv_channels": dim if dim * heads != hf["hidden_size"] or self.explicit_head_dim else None,
            "max_position_embeddings": hf.get("max_position_embeddings", 2048),
            "rope_theta": theta,
            "rope_scaling_factor": _rope_scaling_factor(scaling),
            "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
            "qkv_bias": self.qkv_bias,
            "qk_layernorm": self.qk_layernorm,
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "init_method_std": float(hf.get("initializer_range", 0.02)),
        }

    def check_experts(self, model: ModelConfig) -> None:
        """Raise ConfigError when `model.num_experts` says MoE and the family is dense, or the reverse,
        and likewise for a shared expert (`model.moe_shared_expert_intermediate_size`)."""
        if bool(model.num_experts) != self.moe:
            what = "is a mixture of experts and needs model.num_experts" if self.moe else "is dense"
            raise ConfigError(f"model.family={self.name} {what}, got model.num_experts={model.num_experts}; "
                              f"set model.family to an MoE family (qwen3_moe, qwen2_moe) or model.num_experts to match")
        if bool(model.moe_shared_expert_intermediate_size) != self.shared_expert:
            what = "has a shared expert and needs" if self.shared_expert else "has no shared expert, so no"
            raise ConfigError(f"model.family={self.name} {what} model.moe_shared_expert_intermediate_size, got "
                              f"{model.moe_shared_expert_intermediate_size}; set model.family to the family with "
                              "that MLP (qwen2_moe has a shared expert) or the field to match")

    def check_options(self, model: ModelConfig) -> None:
        """Raise ConfigError when `model`'s options are not this family's (no HF equivalent)."""
        self.check_experts(model)
        if (model.qkv_bias, model.qk_layernorm) != (self.qkv_bias, self.qk_layernorm):
            raise ConfigError(
                f"family {self.name} means qkv_bias={str(self.qkv_bias).lower()} and "
                f"qk_layernorm={str(self.qk_layernorm).lower()}, got qkv_bias={str(model.qkv_bias).lower()} and "
                f"qk_layernorm={str(model.qk_layernorm).lower()}; set model.family to the family that has those "
                "options (no HF model of this family has them)"
            )

    def hf_config(self, model: ModelConfig) -> dict[str, Any]:
        self.check_options(model)
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": model.rope_theta}
        if model.rope_scaling_factor is not None:
            rope = {"rope_type": "llama3", "rope_theta": model.rope_theta, "factor": model.rope_scaling_factor,
                    **LLAMA3_ROPE_FIXED}
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
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
            **self.hf_flags,
        }

    def transformer_options(self, model: ModelConfig) -> dict[str, Any]:
        self.check_experts(model)
        return {"add_qkv_bias": model.qkv_bias, "qk_layernorm": model.qk_layernorm}

    def ignorable_hf_names(self, model: ModelConfig, hf_names: set[str]) -> set[str]:
        ignorable = {n for n in hf_names if n.endswith("rotary_emb.inv_freq")}  # older transformers' buffer
        if model.tie_word_embeddings:
            ignorable |= {"lm_head.weight"} & hf_names  # some tied checkpoints store the copy
        return ignorable

    def tensor_rules(self, model: ModelConfig) -> list[TensorRule]:
        """The layout's rules; the options are read off `model` (not the family) so a model
        config with options outside its family still converts as it is built."""
        groups = model.num_query_groups or model.num_attention_heads
        dim = head_dim(model)
        q_rows, kv_rows = model.num_attention_heads * dim, groups * dim
        h, f, v = model.hidden_size, model.ffn_hidden_size, model.vocab_size
        attn, mlp, layer = "model.layers.{i}.self_attn", "model.layers.{i}.mlp", "decoder.layers.{i}"
        rules = [
            TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((v, h),)),
            TensorRule(f"{layer}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), ((h,),)),
            TensorRule(f"{layer}.self_attention.linear_qkv.weight",
                       (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
                       ((q_rows, h), (kv_rows, h), (kv_rows, h)), "qkv"),
            TensorRule(f"{layer}.self_attention.linear_proj.weight", (f"{attn}.o_proj.weight",), ((h, q_rows),)),
            TensorRule(f"{layer}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
                       ((h,),)),
            TensorRule(f"{layer}.mlp.linear_fc1.weight", (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"),
                       ((f, h), (f, h)), "gate_up"),
            TensorRule(f"{layer}.mlp.linear_fc2.weight", (f"{mlp}.down_proj.weight",), ((h, f),)),
            TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),)),
        ]
        if model.qkv_bias:
            rules.append(TensorRule(f"{layer}.self_attention.linear_qkv.bias",
                                    (f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"),
                                    ((q_rows,), (kv_rows,), (kv_rows,)), "qkv"))
        if model.qk_layernorm:
            rules.append(TensorRule(f"{layer}.self_attention.q_layernorm.weight", (f"{attn}.q_norm.weight",), ((dim,),)))
            rules.append(TensorRule(f"{layer}.self_attention.k_layernorm.weight", (f"{attn}.k_norm.weight",), ((dim,),)))
        if not model.tie_word_embeddings:
            rules.append(TensorRule("output_layer.weight", ("lm_head.weight",), ((v, h),)))
        return rules
