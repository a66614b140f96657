"""Checks of a `Config` against the world it will run in, done before any process group starts.

Every problem found is reported at once, each with the values seen and a way to fix it. One module
per concern: `values` (single values out of range, checked first: the others compute with them),
`layout`, `algorithm`, `hardware`, `rollout`.
"""

from __future__ import annotations

from rlsd_megatron.config import Config, ConfigError
from rlsd_megatron.config_checks.algorithm import algorithm_problems, inert_setting_problems, warm_start_problems
from rlsd_megatron.config_checks.hardware import (hardware_problems, recompute_problems, resolve_transformer_impl,
                                                  transformer_engine_available)
from rlsd_megatron.config_checks.layout import deepstack_problems, expert_problems, layout_problems
from rlsd_megatron.config_checks.rollout import (engine_ranks, off_policy_problems, placement_problems,
                                                 rollout_problems, routing_replay_problems)
from rlsd_megatron.config_checks.values import value_problems

__all__ = ["algorithm_problems", "deepstack_problems", "engine_ranks", "expert_problems", "hardware_problems",
           "inert_setting_problems",
           "layout_problems", "off_policy_problems", "placement_problems", "recompute_problems",
           "resolve_transformer_impl", "rollout_problems", "routing_replay_problems", "transformer_engine_available",
           "validate_config", "value_problems", "warm_start_problems"]


def validate_config(cfg: Config, world_size: int, *, cuda_available: bool | None = None,
                    te_available: bool | None = None) -> None:
    """Raise one ConfigError listing every layout, batch, hardware and rollout problem of `cfg`
    (values out of range alone when there are any: the other checks compute with them)."""
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if te_available is None:
        te_available = cuda_available and transformer_engine_available()
    learners = world_size - engine_ranks(cfg) if 1 <= engine_ranks(cfg) < world_size else world_size
    problems = value_problems(cfg) or (
        placement_problems(cfg, world_size) + layout_problems(cfg, learners) + algorithm_problems(cfg)
        + hardware_problems(cfg, cuda_available=cuda_available, te_available=te_available)
        + rollout_problems(cfg, cuda_available=cuda_available) + routing_replay_problems(cfg) + warm_start_problems(cfg)
        + inert_setting_problems(cfg))
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
