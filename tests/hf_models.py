"""Random Hugging Face models for tests (built from our ModelConfig, no hub access)."""

from __future__ import annotations

import torch

from rlsd_megatron.config import ModelConfig

# What sets each family apart in the HF mapping: Llama-3 rope scaling (llama), QKV bias and tied
# embeddings (qwen2), q/k RMSNorm with an explicit head dim (qwen3), routed experts: 4 of width 16,
# top-2 with renormalised probabilities, the load-balancing loss off (qwen3_moe); QKV bias, routed
# experts whose top-2 softmax values are not renormalised (as released) and a gated shared expert of
# width 24 (qwen2_moe).
FAMILY_FEATURES = {
    "llama": dict(rope_theta=500000.0, rope_scaling_factor=8.0, max_position_embeddings=256),
    "qwen2": dict(qkv_bias=True, tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3": dict(qk_layernorm=True, kv_channels=32, rope_theta=1000000.0),
    "qwen3_moe": dict(qk_layernorm=True, kv_channels=16, hidden_size=32, rope_theta=1000000.0, num_experts=4,
                      moe_router_topk=2, moe_ffn_hidden_size=16, moe_norm_topk_prob=True, moe_aux_loss_coeff=0.0),
    "qwen2_moe": dict(qkv_bias=True, hidden_size=32, rope_theta=1000000.0, num_experts=4, moe_router_topk=2,
                      moe_ffn_hidden_size=16, moe_norm_topk_prob=False, moe_aux_loss_coeff=0.0,
                      moe_shared_expert_intermediate_size=24),
}


def tiny_model(family: str, **fields) -> ModelConfig:
    """A tiny `ModelConfig` of `family` with its distinguishing features: GQA (4 heads, 2 groups,
    TP=2-divisible), vocab 97 (padded under TP), 2 layers of width 64; `fields` override any."""
    base = dict(vocab_size=97, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=96)
    return ModelConfig(family=family, **{**base, **FAMILY_FEATURES[family], **fields})


def tiny_families(**fields) -> dict[str, ModelConfig]:
    """`tiny_model` of every family with the same overrides."""
    return {family: tiny_model(family, **fields) for family in FAMILY_FEATURES}


def random_hf_model(model: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    attn_implementation: str = "eager", **config_extra):
    """`rollout.embedded.build_hf_model` with every tensor perturbed: HF zero-inits biases and
    one-inits norms, which would hide mapping mistakes on those tensors."""
    from rlsd_megatron.rollout.embedded import build_hf_model

    torch.manual_seed(seed)
    hf = build_hf_model(model, dtype=dtype, attn_implementation=attn_implementation, **config_extra)
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return hf


def hf_checkpoint_state(hf, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`hf`'s tensors (or `tensors` keyed by its parameter names, e.g. gradients) under their
    checkpoint names (what `save_pretrained` writes and our mapping reads): an MoE layer's fused
    experts one by one (`rollout.embedded.checkpoint_views`). Dense models' names pass through."""
    from rlsd_megatron.rollout.embedded import checkpoint_views

    return checkpoint_views(dict(hf.state_dict()) if tensors is None else dict(tensors))


def tiny_vision_language_model(model_type: str = "qwen2_5_vl", **fields) -> ModelConfig:
    """A tiny VL `ModelConfig`; `fields` override the text fields. Both have a 2-block ViT of width 32
    with 4-pixel patches and 2x2 merging, image token 96, video token 95.
    - qwen2_5_vl: `tiny_model("qwen2")` (head dim 16: chunked M-RoPE sections 2/3/3 pairs) and
      16-pixel windows (so images of a few merged tokens per side span several windows);
    - qwen3_vl: `tiny_model("qwen3")` with 4 layers (head dim 32: interleaved sections 6/5/5 pairs,
      as 24/20/20 of 64 in Qwen3-VL-8B), a 4x4 learned position grid (resampled to every image) and
      DeepStack features of both blocks added after decoder layers 0 and 1 (both on PP=2's first stage)."""
    from rlsd_megatron.config import VisionConfig

    common = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, image_token_id=96, video_token_id=95,
                  model_type=model_type)
    if model_type == "qwen3_vl":
        vision = VisionConfig(**common, hidden_act="gelu_pytorch_tanh", num_position_embeddings=16,
                              deepstack_visual_indexes=[0, 1], mrope_section=[6, 5, 5])
        return tiny_model("qwen3", vision=vision, **{"num_layers": 4, **fields})
    vision = VisionConfig(**common, window_size=16, fullatt_block_indexes=[1], mrope_section=[2, 3, 3])
    return tiny_model("qwen2", vision=vision, **fields)


def random_hf_vision_language_model(model: ModelConfig, *, seed: int = 0, attn_implementation: str = "eager"):
    """transformers' own `<Qwen2_5_VL | Qwen3VL>ForConditionalGeneration` for `model` (fp32, eval
    mode), every tensor perturbed as in `random_hf_model`."""
    import transformers

    from rlsd_megatron.models.hf_config import hf_config_from_model

    torch.manual_seed(seed)
    hf_config = hf_config_from_model(model)
    config = transformers.AutoConfig.for_model(**hf_config)
    model_class = getattr(transformers, hf_config["architectures"][0])
    hf = model_class._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return hf.eval()
