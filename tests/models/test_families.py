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
    assert sorted(FAMILY_FEATURES) == supported_families() == ["llama", "qwen2", "qwen3", "qwen3_moe"]


@pytest.mark.parametrize("name", supported_families())
def test_family_found_by_architecture_and_by_model_type(name):
    hf = hf_config_from_model(tiny_model(name))
    assert family_for_hf(hf).name == name
    assert family_for_hf({**hf, "architectures": None}).name == name  # older configs: model_type only
    assert model_fields_from_hf(hf)["family"] == name


def test_unknown_families_list_the_supported_ones():
    with pytest.raises(ConfigError, match=r"model.family='mistral' is not supported; supported: "
                                          r"\['llama', 'qwen2', 'qwen3', 'qwen3_moe'\]"):
        family_of(ModelConfig(family="mistral"))
    with pytest.raises(ConfigError, match=r"architectures=\['MistralForCausalLM'\] / model_type='mistral' is not "
                                          r"supported; supported: \['LlamaForCausalLM', 'Qwen2ForCausalLM', "
                                          r"'Qwen3ForCausalLM', 'Qwen3MoeForCausalLM'\] "
                                          r"\(model_type \['llama', 'qwen2', 'qwen3', 'qwen3_moe'\]\)"):
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
        (False, False, None), (True, False, None), (False, True, 16), (False, True, 8)]


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
