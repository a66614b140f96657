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
    assert sorted(FAMILY_FEATURES) == supported_families() == ["llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("name", supported_families())
def test_family_found_by_architecture_and_by_model_type(name):
    hf = hf_config_from_model(tiny_model(name))
    assert family_for_hf(hf).name == name
    assert family_for_hf({**hf, "architectures": None}).name == name  # older configs: model_type only
    assert model_fields_from_hf(hf)["family"] == name


def test_unknown_families_list_the_supported_ones():
    with pytest.raises(ConfigError, match=r"model.family='mistral' is not supported; supported: "
                                          r"\['llama', 'qwen2', 'qwen3'\]"):
        family_of(ModelConfig(family="mistral"))
    with pytest.raises(ConfigError, match=r"architectures=\['MistralForCausalLM'\] / model_type='mistral' is not "
                                          r"supported; supported: \['LlamaForCausalLM', 'Qwen2ForCausalLM', "
                                          r"'Qwen3ForCausalLM'\] \(model_type \['llama', 'qwen2', 'qwen3'\]\)"):
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
        (False, False, None), (True, False, None), (False, True, 16)]
