"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3's attention with routed experts in every layer.

Each layer's MLP is a router (a bias-free linear to `num_experts` logits) and `num_experts`
SwiGLU experts of width `moe_ffn_hidden_size`; a token goes to its top-k experts, weighted by
the softmax of its router logits over those k (HF: softmax over all experts, top-k, then divided
by their sum when `norm_topk_prob`; megatron-core: top-k of the logits, then softmax over them,
the same numbers). Without `norm_topk_prob` the weights are the full softmax's top-k values,
which is megatron-core's `moe_router_pre_softmax`.

The load-balancing loss: `router_aux_loss_coef` becomes `model.moe_aux_loss_coeff` as it is, and
the learner adds transformers' loss (`learner.moe_aux_loss`): HF pools every layer's tokens into
one loss E·Σ_e f_e·P_e (f_e: share of routed slots, summing to k), which megatron-core's (one per
layer and micro-batch with f_e summing to 1, scaled by the tokens for a finalize step our learner
replaces) is not, so megatron's stays off.

Tensor names: HF checkpoints keep every expert on its own (`mlp.experts.{j}.gate_proj.weight`,
what `save_pretrained` writes and SGLang loads; transformers 5 fuses them into 3-D tensors in
memory only); canonical Megatron names are those of megatron-core's `SequentialMLP` at EP=1
(`mlp.experts.local_experts.{j}.linear_fc1.weight`, fc1 = [gate; up] as in the dense layout),
with global expert numbers (`models.sharding` maps EP ranks' local experts and `TEGroupedMLP`'s
`weight{j}` onto them).
"""

from __future__ import annotations

from typing import Any

from rlsd_megatron.config import ConfigError, ModelConfig
from rlsd_megatron.models.families.base import TensorRule
from rlsd_megatron.models.families.qwen3 import Qwen3


def expert_width(model: ModelConfig) -> int:
    """One expert's SwiGLU width: `moe_ffn_hidden_size`, else `ffn_hidden_size`."""
    return model.moe_ffn_hidden_size or model.ffn_hidden_size


class Qwen3Moe(Qwen3):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    moe = True
    hf_flags = {"attention_bias": False, "decoder_sparse_step": 1, "mlp_only_layers": []}

    def refuse_hf(self, hf: dict[str, Any]) -> None:
        super().refuse_hf(hf)
        if hf.get("use_sliding_window"):
            raise ConfigError("model.hf_config: sliding-window attention (use_sliding_window=true) is not supported")
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ConfigError(
                f"model.hf_config: dense layers among the MoE layers (mlp_only_layers={hf.get('mlp_only_layers')}, "
                f"decoder_sparse_step={hf.get('decoder_sparse_step')}) are not supported; only models with routed "
                f"experts in every layer (mlp_only_layers=[], decoder_sparse_step=1), as every released {self.name} model"
            )

    def fields_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
        fields = super().fields_from_hf(hf)
        # transformers 5 writes `num_local_experts`, the released configs `num_experts`.
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        if not experts:
            raise ConfigError("model.hf_config: a Qwen3-MoE config without num_experts; set it (e.g. 128)")
        return {
            **fields,
            "num_experts": experts,
            "moe_router_topk": hf["num_experts_per_tok"],
            "moe_ffn_hidden_size": hf["moe_intermediate_size"],
            "moe_norm_topk_prob": bool(hf.get("norm_topk_prob", False)),  # transformers' default
            "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.001)),
        }

    def hf_config(self, model: ModelConfig) -> dict[str, Any]:
        return {
            **super().hf_config(model),
            "num_experts": model.num_experts,
            "num_experts_per_tok": model.moe_router_topk,
            "moe_intermediate_size": expert_width(model),
            "norm_topk_prob": model.moe_norm_topk_prob,
            "router_aux_loss_coef": model.moe_aux_loss_coeff,
        }

    def transformer_options(self, model: ModelConfig) -> dict[str, Any]:
        return {
            **super().transformer_options(model),
            "num_moe_experts": model.num_experts,
            "moe_router_topk": model.moe_router_topk,
            "moe_ffn_hidden_size": expert_width(model),
            "moe_router_score_function": "softmax",
            # norm_topk_prob: softmax over the k chosen logits; without it, the full softmax's top-k.
            "moe_router_pre_softmax": not model.moe_norm_topk_prob,
            # megatron-core's aux loss is per layer and token-scaled for its own finalize; the learner
            # adds transformers' pooled one instead (`learner.moe_aux_loss`).
            "moe_router_load_balancing_type": "none",
            "moe_aux_loss_coeff": 0.0,
        }

    def tensor_rules(self, model: ModelConfig) -> list[TensorRule]:
        """The dense layout's rules with its MLP replaced by the router and one rule pair per expert."""
        h, f = model.hidden_size, expert_width(model)
        mlp, layer = "model.layers.{i}.mlp", "decoder.layers.{i}.mlp"
        rules = [rule for rule in super().tensor_rules(model) if not rule.megatron.startswith(f"{layer}.linear_fc")]
        rules.append(TensorRule(f"{layer}.router.weight", (f"{mlp}.gate.weight",), ((model.num_experts, h),)))
        for j in range(model.num_experts):
            expert, hf_expert = f"{layer}.experts.local_experts.{j}", f"{mlp}.experts.{j}"
            rules.append(TensorRule(f"{expert}.linear_fc1.weight",
                                    (f"{hf_expert}.gate_proj.weight", f"{hf_expert}.up_proj.weight"),
                                    ((f, h), (f, h)), "gate_up"))
            rules.append(TensorRule(f"{expert}.linear_fc2.weight", (f"{hf_expert}.down_proj.weight",), ((h, f),)))
        return rules
