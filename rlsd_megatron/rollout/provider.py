"""Builds the rollout engine a config asks for; the one place that picks SGLang or embedded.

`rollout.backend=auto` means SGLang when CUDA is available and the embedded `transformers`
engine otherwise; asking for SGLang without it installed fails with the install command.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlsd_megatron.config import Config, ConfigError, RolloutConfig
from rlsd_megatron.config_checks import rollout_problems
from rlsd_megatron.dtypes import float_type
from rlsd_megatron.rollout.engine import RolloutEngine, SamplingParams



def resolve_backend(backend: str) -> str:
    """'sglang' or 'embedded' for a `rollout.backend` value."""
    if backend == "auto":
        return "sglang" if torch.cuda.is_available() else "embedded"
    if backend not in ("sglang", "embedded"):
        raise ConfigError(f"rollout.backend={backend!r}; expected auto, sglang or embedded")
    return backend


def create_engine(cfg: Config, *, group=None, base_gpu_id: int = 0, **engine_kwargs) -> RolloutEngine:
    """The engine for `cfg` on this rank. For SGLang, construct it on every rank of `group` (the
    learner ranks sharing the engine's GPUs); `engine_kwargs` go to the engine class."""
    problems = rollout_problems(cfg, cuda_available=torch.cuda.is_available())
    if problems:
        raise ConfigError("; ".join(problems))
    backend = resolve_backend(cfg.rollout.backend)
    dtype = float_type(cfg.precision.params_dtype)
    if backend == "embedded":
        from rlsd_megatron.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(cfg.model, dtype=dtype.torch_dtype, return_routed_experts=cfg.rollout.routing_replay,
                              **engine_kwargs)
    from rlsd_megatron.rollout.sglang_engine import SGLangEngine

    return SGLangEngine(cfg.model, model_path=cfg.model.hf_config, engine_tp=cfg.rollout.engine_tp,
                        mem_fraction_static=cfg.rollout.mem_fraction_static, base_gpu_id=base_gpu_id, group=group,
                        dtype=dtype.hf_name, seed=cfg.train.seed, fp8_weights=cfg.rollout.fp8_weights,
                        processor_path=cfg.data.tokenizer_dir, return_routed_experts=cfg.rollout.routing_replay,
                        server_args=sglang_server_args(cfg.rollout), **engine_kwargs)


def sglang_server_args(rollout: RolloutConfig) -> dict:
    """`rollout.sglang_server_args` over the settings other rollout fields imply."""
    implied = {"enable_deterministic_inference": True} if rollout.deterministic else {}
    return {**implied, **rollout.sglang_server_args}


def sampling_params(rollout: RolloutConfig, *, validation: bool = False, stop_token_ids: Sequence[int] = (),
                    seed: int | None = None) -> SamplingParams:
    """Training (or validation) sampling parameters from the config."""
    if validation:
        return SamplingParams(n=rollout.val_n, temperature=rollout.val_temperature, top_p=rollout.val_top_p,
                              top_k=rollout.val_top_k, max_new_tokens=rollout.max_new_tokens,
                              stop_token_ids=tuple(stop_token_ids), seed=seed,
                              presence_penalty=rollout.val_presence_penalty)
    return SamplingParams(n=rollout.n, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                          max_new_tokens=rollout.max_new_tokens, stop_token_ids=tuple(stop_token_ids), seed=seed,
                          return_routed_experts=rollout.routing_replay)
