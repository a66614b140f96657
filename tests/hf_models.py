"""Random Hugging Face models for tests (built from our ModelConfig, no hub access)."""

from __future__ import annotations

import torch

from rlsd_megatron.config import ModelConfig


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
