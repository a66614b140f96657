"""FP8 rollout weights on CPU: the block quantiser against e4m3's rounding bound and hand-computed
scales, the HF-name transform on tiny Llama / Qwen3 models, FP8 tensors through buckets, and the
errors for engine configs whose format a push cannot produce."""

from __future__ import annotations

import json

import pytest
import torch

from rlsd_megatron.config import Config, ConfigError, PrecisionConfig, RolloutConfig
from rlsd_megatron.rollout.buckets import pack_buckets, plan_buckets
from rlsd_megatron.rollout.fp8 import (
    FP8_DTYPE,
    Fp8BlockConfig,
    dequantize_fp8_blockwise,
    fp8_block_quantization_config,
    fp8_quant_config,
    fp8_rollout_specs,
    fp8_rollout_tensors,
    quantize_fp8_blockwise,
)
from tests.hf_models import random_hf_model, tiny_model

SIZES = dict(hidden_size=32, ffn_hidden_size=48)
LLAMA = tiny_model("llama", **SIZES)
QWEN3 = tiny_model("qwen3", **SIZES, kv_channels=16, tie_word_embeddings=True)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def block_scales(scale_inv: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Each element's scale_inv."""
    return scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:shape[0], :shape[1]]


# -- the quantiser -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape, block", [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((5, 7), (2, 3)),
                                          ((64, 48), (1, 16))])
def test_dequantised_error_within_e4m3_rounding(shape, block):
    """|dequantised - w| <= max(2^-4 |w|, 2^-10 scale_inv): half a spacing of e4m3's 3-bit mantissa
    in its normal range, half its subnormal spacing 2^-9 below 2^-6 (see rollout.fp8); the 1e-5
    slack covers fp32 rounding in w / scale_inv and fp8 * scale_inv (2^-24 each)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen) * torch.exp(3 * torch.randn(shape, generator=gen))  # wide range
    fp8, scale_inv = quantize_fp8_blockwise(weight, block)
    assert fp8.dtype == FP8_DTYPE and fp8.shape == weight.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    error = (dequantize_fp8_blockwise(fp8, scale_inv, block) - weight).abs()
    bound = torch.maximum(weight.abs() * 2**-4, block_scales(scale_inv, shape, block) * 2**-10)
    assert (error <= bound * (1 + 1e-5)).all(), float((error / bound).max())
    assert float((error / bound).max()) > 0.5  # the bound is tight: rounding does come near it


def test_bf16_weights_quantise_like_their_fp32_values():
    weight = torch.randn(130, 260).bfloat16()
    got, want = quantize_fp8_blockwise(weight), quantize_fp8_blockwise(weight.float())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_exact_scales_on_a_hand_built_weight():
    """Blocks of 2x3: amax 448 -> scale_inv 1, amax 896 -> 2, all zero -> 1, amax 3.5 -> 2^-7; every
    scaled value is exact in e4m3, so the round trip is exact."""
    weight = torch.tensor([
        [448.0, -1.0, 0.5, 896.0, -448.0, 2.0],
        [-448.0, 16.0, 0.0, 0.0, 224.0, -896.0],
        [0.0, 0.0, 0.0, 3.5, -1.75, 0.4375],
        [0.0, 0.0, 0.0, 0.0, 0.0, -3.5],
    ])
    fp8, scale_inv = quantize_fp8_blockwise(weight, (2, 3))
    assert scale_inv.tolist() == [[1.0, 2.0], [1.0, 2.0**-7]]
    assert fp8.float()[:2, 3:].tolist() == [[448.0, -224.0, 1.0], [0.0, 112.0, -448.0]]
    assert fp8.float()[2:, :3].abs().sum() == 0
    assert torch.equal(dequantize_fp8_blockwise(fp8, scale_inv, (2, 3)), weight)


def test_edge_blocks_scale_what_is_left_of_the_weight():
    weight = torch.randn(130, 257)
    fp8, scale_inv = quantize_fp8_blockwise(weight)
    assert scale_inv.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            block = weight[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)]
            assert scale_inv[i, j] == block.abs().max() / 448, (i, j, block.shape)
    assert fp8.float().abs().max() == 448  # the largest element of every block lands on e4m3's max


def test_zero_blocks_get_scale_one_and_stay_zero():
    weight = torch.zeros(256, 200)
    weight[128:, :128] = torch.randn(128, 128)
    fp8, scale_inv = quantize_fp8_blockwise(weight)
    assert scale_inv[0].tolist() == [1.0, 1.0] and scale_inv[1, 1] == 1.0 and scale_inv[1, 0] < 1
    assert not torch.isnan(fp8.float()).any() and fp8.float()[:128].abs().sum() == 0
    assert torch.equal(dequantize_fp8_blockwise(fp8, scale_inv)[:128], weight[:128])


def test_only_2d_weights():
    with pytest.raises(ValueError, match="2-D weights"):
        quantize_fp8_blockwise(torch.ones(4))


# -- the transform over HF names -----------------------------------------------------------------
@pytest.mark.parametrize("model", [LLAMA, QWEN3], ids=["llama", "qwen3"])
def test_transform_quantises_exactly_the_projection_weights(model):
    state = list(random_hf_model(model).state_dict().items())
    fp8 = Fp8BlockConfig(block=(16, 16))
    out = list(fp8_rollout_tensors(state, fp8))
    quantised = {f"model.layers.{i}.{p}.weight" for i in range(model.num_layers) for p in PROJECTIONS}
    assert quantised <= {name for name, _ in state}
    expected = []
    for name, tensor in state:
        expected.append(name)
        if name in quantised:
            expected.append(name.removesuffix("weight") + "weight_scale_inv")
    assert [name for name, _ in out] == expected  # each scale right after its weight, order kept
    outputs, originals = dict(out), dict(state)
    for name, tensor in originals.items():
        if name in quantised:
            want, want_scale = quantize_fp8_blockwise(tensor, (16, 16))
            assert torch.equal(outputs[name], want) and torch.equal(outputs[name + "_scale_inv"], want_scale)
        else:  # embeddings, lm_head, norms (q/k norms for Qwen3) untouched
            assert outputs[name] is tensor, name
    specs = list(fp8_rollout_specs(((n, tuple(t.shape), t.dtype) for n, t in state), fp8))
    assert specs == [(n, tuple(t.shape), t.dtype) for n, t in out]


def test_ignored_layers_stay_unquantised():
    state = list(random_hf_model(QWEN3).state_dict().items())
    fp8 = fp8_quant_config({"quantization_config": {
        **fp8_block_quantization_config((16, 16)),
        "modules_to_not_convert": ["model.layers.1.mlp", "layers.0.self_attn.o_proj", "mlp.gate", "lm_head"]}},
        fp8_weights=True)
    dtypes = {name: tensor.dtype for name, tensor in fp8_rollout_tensors(state, fp8)}
    assert dtypes["model.layers.1.mlp.gate_proj.weight"] == torch.float32  # under an ignored module
    assert dtypes["model.layers.0.self_attn.o_proj.weight"] == torch.float32  # listed without "model."
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" not in dtypes
    # "mlp.gate" is a MoE router's name: it does not match gate_proj (whole path components only).
    assert dtypes["model.layers.0.mlp.gate_proj.weight"] == FP8_DTYPE
    assert dtypes["model.layers.1.self_attn.q_proj.weight"] == FP8_DTYPE


def test_fp8_stream_round_trips_through_buckets():
    state = list(random_hf_model(QWEN3, dtype=torch.bfloat16).state_dict().items())
    pushed = list(fp8_rollout_tensors(state, Fp8BlockConfig(block=(16, 16))))
    got, buckets = [], 0
    for bucket in pack_buckets(pushed, bucket_bytes=4096):
        got.extend((name, tensor.clone()) for name, tensor in bucket.named_tensors())
        buckets += 1
        del bucket
    assert [(n, t.shape, t.dtype) for n, t in got] == [(n, t.shape, t.dtype) for n, t in pushed]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, pushed))
    assert {t.dtype for _, t in got} == {torch.bfloat16, FP8_DTYPE, torch.float32}
    # Dtype changes (32 here) do not split buckets: as many as for the same bytes in one dtype.
    as_bytes = [(name, (t.numel() * t.element_size(),), torch.uint8) for name, t in pushed]
    switches = sum(a.dtype != b.dtype for (_, a), (_, b) in zip(pushed, pushed[1:]))
    assert buckets == len(plan_buckets(as_bytes, 4096)) < switches


# -- engine configs ----------------------------------------------------------------------------
QWEN3_FP8 = {"architectures": ["Qwen3ForCausalLM"], "quantization_config": {
    "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}}


def with_quantization(**quantization) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "quantization_config": quantization}


def test_block_fp8_configs_are_read():
    assert fp8_quant_config(QWEN3_FP8, fp8_weights=True) == Fp8BlockConfig()
    assert fp8_quant_config({"quantization_config": fp8_block_quantization_config((64, 32))},
                            fp8_weights=True) == Fp8BlockConfig(block=(64, 32))
    ignored = with_quantization(**QWEN3_FP8["quantization_config"], ignored_layers=["model.layers.0.mlp.", "lm_head"])
    assert fp8_quant_config(ignored, fp8_weights=True).ignored_layers == ("layers.0.mlp", "lm_head")
    assert fp8_quant_config({"architectures": ["Qwen3ForCausalLM"]}, fp8_weights=False) is None


@pytest.mark.parametrize("config, fp8_weights, message", [
    ({"architectures": ["Qwen3ForCausalLM"]}, True,
     r"rollout.fp8_weights=true, but the engine's config.json has no quantization_config.*Qwen/Qwen3-8B-FP8"
     r".*set model.hf_config.*Or set rollout.fp8_weights=false"),
    (QWEN3_FP8, False, r"quantised \(quant_method='fp8'.*rollout.fp8_weights=false.*Set rollout.fp8_weights=true"),
    (with_quantization(quant_method="awq", bits=4), False, r"quant_method='awq'.*unquantised checkpoint"),
    (with_quantization(quant_method="modelopt", quant_algo="FP8"), True,
     r"ModelOpt.*static activation scales \(input_scale\) calibrated on data.*not activation scales.*block-wise FP8"),
    (with_quantization(quant_method="fp8", activation_scheme="static"), True,
     r"no weight_block_size: per-tensor FP8.*largest scale.*calibrated on data"),
    (with_quantization(quant_method="fp8", activation_scheme="static", weight_block_size=[128, 128]), True,
     r"activation_scheme='static': block-wise FP8 needs dynamic activation scales"),
    (with_quantization(quant_method="fp8", activation_scheme="dynamic", weight_block_size=[128]), True,
     r"weight_block_size must be two positive integers"),
    (with_quantization(**QWEN3_FP8["quantization_config"], scale_fmt="ue8m0"), True, r"UE8M0"),
    (with_quantization(quant_method="mxfp8", activation_scheme="dynamic"), True, r"'mxfp8'.*cannot receive"),
    (with_quantization(quant_method="compressed-tensors"), True, r"'compressed-tensors'.*cannot receive"),
], ids=["no-fp8-config", "fp8-not-requested", "awq-not-requested", "modelopt", "per-tensor", "static-block",
        "bad-block", "ue8m0", "mxfp8", "compressed-tensors"])
def test_config_errors_say_why_and_what_to_do(config, fp8_weights, message):
    with pytest.raises(ConfigError, match=message):
        fp8_quant_config(config, fp8_weights=fp8_weights)


def test_sglang_engine_format(tmp_path):
    from rlsd_megatron.rollout.sglang_engine import engine_fp8_format, engine_hf_config

    assert engine_fp8_format(QWEN3_FP8, fp8_weights=True) == Fp8BlockConfig()
    with pytest.raises(ConfigError, match=r"Llama on sglang .*weight_scale_inv.*#30234"):
        engine_fp8_format({**QWEN3_FP8, "architectures": ["LlamaForCausalLM"]}, fp8_weights=True)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    assert engine_hf_config(tmp_path)["quantization_config"] == {"quant_method": "modelopt", "quant_algo": "FP8"}
    with pytest.raises(ConfigError, match="ModelOpt"):
        engine_fp8_format(engine_hf_config(tmp_path), fp8_weights=True)


def test_embedded_engine_refuses_fp8_weights():
    from rlsd_megatron.rollout.provider import create_engine

    cfg = Config(model=QWEN3, precision=PrecisionConfig(params_dtype="bf16"),
                 rollout=RolloutConfig(backend="embedded", fp8_weights=True))
    with pytest.raises(ConfigError, match="needs the SGLang backend"):
        create_engine(cfg)


def test_data_parallel_engines_share_one_format():
    from rlsd_megatron.rollout.data_parallel import DataParallelEngines
    from rlsd_megatron.rollout.embedded import EmbeddedEngine

    first, second = EmbeddedEngine(QWEN3), EmbeddedEngine(QWEN3)
    assert DataParallelEngines([first, second]).fp8_format is None
    second.fp8_format = Fp8BlockConfig()
    with pytest.raises(ValueError, match="different weight formats"):
        DataParallelEngines([first, second]).fp8_format
