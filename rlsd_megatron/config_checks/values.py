"""Range checks of single config values that no other setting can make sense of: sizes and counts
below 1, negative intervals, sampling parameters the engine would refuse mid-run.

`config_checks.validate_config` runs these first: its layout arithmetic divides by several of
these values, and without them a zero surfaced as a bare ZeroDivisionError there, or mid-run (a
`logging.log_interval` of 0 at the first progress line, a `rollout.temperature` of 0 in the first
scoring pass after the first generation).
"""

from __future__ import annotations

from rlsd_megatron.config import Config

# (section, field) -> the least value that means something; None values (optional fields) pass.
AT_LEAST: dict[tuple[str, str], int] = {
    ("parallel", "tp"): 1, ("parallel", "pp"): 1, ("parallel", "cp"): 1, ("parallel", "dp"): 1, ("parallel", "vpp"): 1,
    ("train", "steps"): 0, ("train", "prompts_per_step"): 1, ("train", "micro_batch_size"): 1,
    ("train", "max_tokens_per_micro_batch"): 1, ("train", "ppo_epochs"): 1, ("train", "optimizer_steps_per_batch"): 1,
    ("train", "max_seq_length"): 1, ("train", "eval_interval"): 0,
    ("warm_start", "max_steps"): 0, ("warm_start", "prompts_per_step"): 1, ("warm_start", "eval_interval"): 1,
    ("optimizer", "lr_warmup_steps"): 0, ("optimizer", "lr_decay_steps"): 1,
    ("rollout", "engine_tp"): 1, ("rollout", "weight_sync_bucket_mb"): 1,
    ("algorithm", "dynamic_sampling_max_rounds"): 1,
    ("checkpoint", "save_interval"): 0, ("checkpoint", "keep_last"): 0,
    ("logging", "log_interval"): 1,
}


def value_problems(cfg: Config) -> list[str]:
    """Every value of `cfg` out of its range, each with the value seen and the range."""
    problems = []
    for (section, name), least in AT_LEAST.items():
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < least:
            problems.append(f"{section}.{name}={value} must be >= {least}")
    return problems + _algorithm_problems(cfg) + _sampling_problems(cfg)


def _algorithm_problems(cfg: Config) -> list[str]:
    """The objective's coefficients, which the loss and the teacher policy would otherwise refuse
    (or misuse) only at the first update."""
    a, problems = cfg.algorithm, []
    if not (0 <= a.clip_low < 1 and a.clip_high >= 0):
        problems.append(f"algorithm.clip_low={a.clip_low} must be in [0, 1) and algorithm.clip_high={a.clip_high} >= 0")
    if a.dual_clip is not None and a.dual_clip <= 1:
        problems.append(f"algorithm.dual_clip={a.dual_clip} must be > 1 (it caps the loss of A < 0 tokens at "
                        "-A*dual_clip), or null to turn it off")
    if a.weight_clip_eps < 0:
        problems.append(f"algorithm.weight_clip_eps={a.weight_clip_eps} must be >= 0 (RLSD's weights are clipped to "
                        "[1 - eps, 1 + eps])")
    if not 0 <= a.distill_beta <= 1:
        problems.append(f"algorithm.distill_beta={a.distill_beta} must be in [0, 1]")
    if a.tis_cap is not None and a.tis_cap <= 0:
        problems.append(f"algorithm.tis_cap={a.tis_cap} must be > 0, or null to turn TIS off")
    if a.teacher_weights == "frozen_sync" and a.teacher_sync_interval < 1:
        problems.append(f"algorithm.teacher_sync_interval={a.teacher_sync_interval} must be >= 1 (updates between "
                        "re-syncs of the frozen_sync teacher)")
    if a.teacher_weights == "ema" and not 0 < a.teacher_ema_rate <= 1:
        problems.append(f"algorithm.teacher_ema_rate={a.teacher_ema_rate} must be in (0, 1]")
    return problems


def _sampling_problems(cfg: Config) -> list[str]:
    """The rollout's training and validation sampling parameters, as the engine checks them."""
    from rlsd_megatron.rollout.provider import sampling_params

    problems = []
    for validation, fields in ((False, "rollout.n / temperature / top_p / max_new_tokens"),
                               (True, "rollout.val_n / val_temperature / val_top_p / val_presence_penalty")):
        try:
            sampling_params(cfg.rollout, validation=validation)
        except ValueError as exc:
            problems.append(f"{fields}: {exc}")
    if cfg.rollout.temperature == 0:
        problems.append("rollout.temperature=0 samples greedily, but the learner's log-probs divide the logits by the "
                        "temperature: use rollout.top_k=1 with temperature 1.0 for greedy rollouts")
    return problems
