"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention with routed experts and a
gated shared expert in every layer.

What differs from Qwen3-MoE (whose routed-expert part, router options, load-balancing loss and
per-expert tensor names this family inherits):
- attention: biases on q/k/v (HF `qkv_bias`, true unless a config says otherwise), no q/k norm,
  head dim hidden / heads;
- routing: softmax over all experts, then top-k, *not* renormalised in the released configs
  (`norm_topk_prob=false`: megatron-core's `moe_router_pre_softmax`); read from config.json;
- a shared expert: one SwiGLU MLP of width `shared_expert_intermediate_size` that every token goes
  through, its output scaled by sigmoid(shared_expert_gate(x)), a bias-free [1, H] linear. That is
  megatron-core's `SharedExpertMLP` with `moe_shared_expert_gate` (`gate_weight` [1, H], sigmoid of
  its linear, the same product), tensor-parallel like a dense MLP, not expert-parallel.

Dense layers among the MoE ones (`mlp_only_layers`, `decoder_sparse_step` > 1) are refused, as
for Qwen3-MoE: no released Qwen2-MoE has them, and SGLang 0.5.23's Qwen2-MoE builds every layer
sparse (`Qwen2MoeDecoderLayer.stage_facts`), so such a model could not be rolled out either.

Tensor names: the shared expert is `mlp.shared_expert.{gate,up,down}_proj.weight` and
`mlp.shared_expert_gate.weight` in HF checkpoints and SGLang (whose loader stacks gate/up into its
`gate_up_proj` by name), `mlp.shared_experts.linear_fc1/linear_fc2/gate_weight` in Megatron.
"""

from __future__ import annotations

from typing import Any

from rlsd_megatron.config import ConfigError, ModelConfig
from rlsd_megatron.models.families.base import TensorRule
from rlsd_megatron.models.families.qwen3_moe import Qwen3Moe


class Qwen2Moe(Qwen3Moe):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    model_type = "qwen2_moe"
    qkv_bias = True
    qk_layernorm = False
    explicit_head_dim = False
    shared_expert = True
    hf_flags = {"qkv_bias": True, "decoder_sparse_step": 1, "mlp_only_layers": []}

    def refuse_hf(self, hf: dict[str, Any]) -> None:
        super().refuse_hf(hf)
        if not hf.get("qkv_bias", True):
            raise ConfigError("model.hf_config: a Qwen2-MoE config with qkv_bias=false is not supported "
                              "(every released Qwen2-MoE has q/k/v biases)")
        if not hf.get("shared_expert_intermediate_size"):
            raise ConfigError(
                f"model.hf_config: a Qwen2-MoE config needs shared_expert_intermediate_size > 0, got "
                f"{hf.get('shared_expert_intermediate_size')!r} (megatron-core cannot build a zero-width shared expert)")

    def fields_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        return {**super().fields_from_hf(hf),
                "moe_shared_expert_intermediate_size": hf["shared_expert_intermediate_size"]}

    def hf_config(self, model: ModelConfig) -> dict[str, Any]:
        return {**super().hf_config(model), "shared_expert_intermediate_size": model.moe_shared_expert_intermediate_size}

    def transformer_options(self, model: ModelConfig) -> dict[str, Any]:
        return {
            **super().transformer_options(model),
            "moe_shared_expert_intermediate_size": model.moe_shared_expert_intermediate_size,
            "moe_shared_expert_gate": True,  # sigmoid(x · gate_weightᵀ) scales the shared expert, as HF's
        }

    def tensor_rules(self, model: ModelConfig) -> list[TensorRule]:
        """Qwen3-MoE's rules (router, routed experts) and the shared expert with its gate."""
        h, s = model.hidden_size, model.moe_shared_expert_intermediate_size
        mlp, shared = "model.layers.{i}.mlp", "decoder.layers.{i}.mlp.shared_experts"
        return super().tensor_rules(model) + [
            TensorRule(f"{shared}.linear_fc1.weight",
                       (f"{mlp}.shared_expert.gate_proj.weight", f"{mlp}.shared_expert.up_proj.weight"),
                       ((s, h), (s, h)), "gate_up"),
            TensorRule(f"{shared}.linear_fc2.weight", (f"{mlp}.shared_expert.down_proj.weight",), ((h, s),)),
            TensorRule(f"{shared}.gate_weight", (f"{mlp}.shared_expert_gate.weight",), ((1, h),)),
        ]
