"""The family registry: lookups by config and by HF config, the errors for families and options
we cannot build, and that every registered family is in the tiny-model test set (so the mapping,
converter and parity tests run it)."""

from __future__ import annotations

import dataclasses

import pytest

from rlsd_megatron.config import ConfigError, ModelConfig
from rlsd_megatron.models.families import family_for_hf, family_of, supported_families
from rlsd_megatron.models.hf_config import hf_config_from_model, model_fields_from_hf
from tests.hf_models import FAMILY_FEATURES, tiny_model


def test_every_registered_family_is_tested():
    assert sorted(FAMILY_FEATURES) == supported_families() == ["llama", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"]


@pytest.mark.parametrize("name", supported_families())
def test_family_found_by_architecture_and_by_model_type(name):
    hf = hf_config_from_model(tiny_model(name))
    assert family_for_hf(hf).name == name
    assert family_for_hf({**hf, "architectures": None}).name == name  # older configs: model_type only
    assert model_fields_from_hf(hf)["family"] == name


def test_unknown_families_list_the_supported_ones():
    with pytest.raises(ConfigError, match=r"model.family='mistral' is not supported; supported: "
                                          r"\['llama', 'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_moe'\]"):
        family_of(ModelConfig(family="mistral"))
    with pytest.raises(ConfigError, match=r"architectures=\['MistralForCausalLM'\] / model_type='mistral' is not "
                                          r"supported; supported: \['LlamaForCausalLM', 'Qwen2ForCausalLM', "
                                          r"'Qwen2MoeForCausalLM', 'Qwen3ForCausalLM', 'Qwen3MoeForCausalLM'\] "
                                          r"\(model_type \['llama', 'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_moe'\]\)"):
        family_for_hf({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})


def test_options_outside_the_family_have_no_hf_config():
    llama_with_bias = dataclasses.replace(tiny_model("llama"), qkv_bias=True)
    with pytest.raises(ConfigError, match="family llama means qkv_bias=false and qk_layernorm=false, got "
                                          "qkv_bias=true and qk_layernorm=false"):
        hf_config_from_model(llama_with_bias)


def test_family_specific_hf_features_are_refused():
    llama = hf_config_from_model(tiny_model("llama"))
    with pytest.raises(ConfigError, match="Llama with attention_bias/mlp_bias is not supported"):
        model_fields_from_hf({**llama, "mlp_bias": True})
    qwen2 = hf_config_from_model(tiny_model("qwen2"))
    with pytest.raises(ConfigError, match=r"sliding-window attention \(use_sliding_window=true\)"):
        model_fields_from_hf({**qwen2, "use_sliding_window": True})
    assert model_fields_from_hf({**llama, "use_sliding_window": True})["family"] == "llama"  # Qwen2's flag only


def test_family_options_follow_the_hf_config():
    """Qwen2 means QKV bias, Qwen3 q/k norm and an explicit head dim even when it equals hidden/heads."""
    fields = {name: model_fields_from_hf(hf_config_from_model(tiny_model(name, kv_channels=None)))
              for name in supported_families()}
    assert [(f["qkv_bias"], f["qk_layernorm"], f["kv_channels"]) for f in fields.values()] == [
        (False, False, None), (True, False, None), (True, False, None), (False, True, 16), (False, True, 8)]


def test_qwen3_moe_hf_config_round_trips_and_reads_released_configs():
    """The MoE fields go to HF's names and back; a released-style config (`num_experts`) and a
    transformers-5-written one (`num_local_experts`) read the same."""
    model = tiny_model("qwen3_moe", moe_norm_topk_prob=False, moe_aux_loss_coeff=0.01)
    hf = hf_config_from_model(model)
    assert {k: hf[k] for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                               "router_aux_loss_coef", "mlp_only_layers", "decoder_sparse_step")} == {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": False,
        "router_aux_loss_coef": 0.01, "mlp_only_layers": [], "decoder_sparse_step": 1}
    fields = model_fields_from_hf(hf)
    assert ModelConfig(**fields) == dataclasses.replace(model, kv_channels=16)
    renamed = {**{k: v for k, v in hf.items() if k != "num_experts"}, "num_local_experts": 4}
    assert model_fields_from_hf(renamed) == fields
    transformers = pytest.importorskip("transformers")
    assert transformers.Qwen3MoeConfig(**hf).num_experts == 4  # transformers reads what we write


def test_qwen3_moe_refuses_dense_layers_and_families_check_num_experts():
    hf = hf_config_from_model(tiny_model("qwen3_moe"))
    with pytest.raises(ConfigError, match=r"dense layers among the MoE layers \(mlp_only_layers=\[1\], "
                                          r"decoder_sparse_step=1\) are not supported"):
        model_fields_from_hf({**hf, "mlp_only_layers": [1]})
    with pytest.raises(ConfigError, match="decoder_sparse_step=2"):
        model_fields_from_hf({**hf, "decoder_sparse_step": 2})
    with pytest.raises(ConfigError, match="model.family=qwen3 is dense, got model.num_experts=4"):
        family_of(tiny_model("qwen3")).transformer_options(tiny_model("qwen3", num_experts=4))
    with pytest.raises(ConfigError, match="model.family=qwen3_moe is a mixture of experts and needs "
                                          "model.num_experts, got model.num_experts=None"):
        hf_config_from_model(tiny_model("qwen3_moe", num_experts=None))


def test_qwen3_moe_router_options_follow_norm_topk_prob():
    """HF renormalises the top-k softmax values (norm_topk_prob) = megatron's softmax over the top-k
    logits (pre_softmax off); without it, the full softmax's top-k (pre_softmax on). Aux loss 0 = none."""
    family = family_of(tiny_model("qwen3_moe"))
    options = family.transformer_options(tiny_model("qwen3_moe"))
    keys = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_pre_softmax",
            "moe_router_load_balancing_type", "moe_router_score_function")
    assert {k: options[k] for k in keys} == {
        "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 16, "moe_router_pre_softmax": False,
        "moe_router_load_balancing_type": "none", "moe_router_score_function": "softmax"}
    options = family.transformer_options(tiny_model("qwen3_moe", moe_norm_topk_prob=False, moe_aux_loss_coeff=0.001))
    # megatron-core's own aux loss stays off: the learner adds transformers' (learner.moe_aux_loss).
    assert (options["moe_router_pre_softmax"], options["moe_router_load_balancing_type"],
            options["moe_aux_loss_coeff"]) == (True, "none", 0.0)


# Qwen1.5-MoE-A2.7B's config.json as released (hub revision of 2024-03; keys transformers 4 wrote).
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
    "model_type": "qwen2_moe", "moe_intermediate_size": 1408, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_qwen2_moe_reads_a_released_config_json(tmp_path):
    """`model.hf_config` pointing at Qwen1.5-MoE-A2.7B's config.json: QKV bias, no q/k norm, 60 experts
    top-4 not renormalised, the shared expert's width, the aux-loss weight; our HF config for it is
    what transformers reads back."""
    import json

    from rlsd_megatron.config import load_config

    (tmp_path / "config.json").write_text(json.dumps(QWEN15_MOE_A27B))
    model = load_config(None, [f"model.hf_config={tmp_path}"]).model
    assert (model.family, model.qkv_bias, model.qk_layernorm, model.kv_channels) == ("qwen2_moe", True, False, None)
    assert (model.num_experts, model.moe_router_topk, model.moe_ffn_hidden_size, model.moe_norm_topk_prob,
            model.moe_shared_expert_intermediate_size, model.moe_aux_loss_coeff) == (60, 4, 1408, False, 5632, 0.001)
    assert (model.hidden_size, model.num_layers, model.ffn_hidden_size, model.rope_theta) == (2048, 24, 5632, 1e6)
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2MoeConfig(**hf_config_from_model(model))
    assert (hf.qkv_bias, hf.num_experts, hf.norm_topk_prob, hf.shared_expert_intermediate_size,
            hf.decoder_sparse_step, hf.mlp_only_layers) == (True, 60, False, 5632, 1, [])


def test_qwen2_moe_refuses_what_megatron_and_sglang_cannot_build():
    hf = hf_config_from_model(tiny_model("qwen2_moe"))
    with pytest.raises(ConfigError, match=r"dense layers among the MoE layers \(mlp_only_layers=\[0\], "
                                          r"decoder_sparse_step=1\) are not supported; .* as every released qwen2_moe"):
        model_fields_from_hf({**hf, "mlp_only_layers": [0]})
    with pytest.raises(ConfigError, match="decoder_sparse_step=2"):
        model_fields_from_hf({**hf, "decoder_sparse_step": 2})
    with pytest.raises(ConfigError, match="qkv_bias=false is not supported"):
        model_fields_from_hf({**hf, "qkv_bias": False})
    with pytest.raises(ConfigError, match="needs shared_expert_intermediate_size > 0, got 0"):
        model_fields_from_hf({**hf, "shared_expert_intermediate_size": 0})
    with pytest.raises(ConfigError, match="model.family=qwen2_moe has a shared expert and needs "
                                          "model.moe_shared_expert_intermediate_size, got None"):
        hf_config_from_model(tiny_model("qwen2_moe", moe_shared_expert_intermediate_size=None))
    with pytest.raises(ConfigError, match="model.family=qwen3_moe has no shared expert, so no "
                                          "model.moe_shared_expert_intermediate_size, got 24"):
        family_of(tiny_model("qwen3_moe")).transformer_options(tiny_model("qwen3_moe", moe_shared_expert_intermediate_size=24))


def test_qwen2_moe_megatron_options():
    """The full softmax's top-k (pre_softmax, as norm_topk_prob=false), the shared expert with its
    sigmoid gate, QKV bias and no q/k norm; megatron's aux loss off as for Qwen3-MoE."""
    options = family_of(tiny_model("qwen2_moe")).transformer_options(tiny_model("qwen2_moe"))
    keys = ("add_qkv_bias", "qk_layernorm", "num_moe_experts", "moe_ffn_hidden_size", "moe_router_pre_softmax",
            "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_router_load_balancing_type")
    assert {k: options[k] for k in keys} == {
        "add_qkv_bias": True, "qk_layernorm": False, "num_moe_experts": 4, "moe_ffn_hidden_size": 16,
        "moe_router_pre_softmax": True, "moe_shared_expert_intermediate_size": 24, "moe_shared_expert_gate": True,
        "moe_router_load_balancing_type": "none"}
