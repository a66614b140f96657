"""Values out of range are config errors naming field, value and range (config_checks/values.py), before
the layout checks that divide by them (a zero was a bare ZeroDivisionError there) or the run
that used them (log_interval=0 at the first progress line, rollout.temperature=0 in the first scoring)."""

from __future__ import annotations

import pytest

from rlsd_megatron.config import ConfigError, load_config
from rlsd_megatron.config_checks import validate_config


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=0"], r"parallel\.tp=0 must be >= 1"),
    (["train.micro_batch_size=0"], r"train\.micro_batch_size=0 must be >= 1"),
    (["train.optimizer_steps_per_batch=0"], r"train\.optimizer_steps_per_batch=0 must be >= 1"),
    (["train.max_tokens_per_micro_batch=0"], r"train\.max_tokens_per_micro_batch=0 must be >= 1"),
    (["logging.log_interval=0"], r"logging\.log_interval=0 must be >= 1"),
    (["warm_start.eval_interval=0"], r"warm_start\.eval_interval=0 must be >= 1"),
    (["checkpoint.save_interval=-1"], r"checkpoint\.save_interval=-1 must be >= 0"),
    (["rollout.temperature=0"], r"rollout\.temperature=0 samples greedily, but the learner's log-probs divide the "
                                r"logits by the temperature: use rollout\.top_k=1 with temperature 1\.0"),
    (["rollout.val_n=0"], r"rollout\.val_n / val_temperature / val_top_p / val_presence_penalty: invalid sampling "
                          r"parameters: n=0 \(need >= 1\)"),
    (["rollout.top_p=0"], r"rollout\.n / temperature / top_p / max_new_tokens: invalid sampling parameters: top_p=0"),
    (["algorithm.dual_clip=1"], r"algorithm\.dual_clip=1\.0 must be > 1"),
    (["algorithm.clip_low=1.5"], r"algorithm\.clip_low=1\.5 must be in \[0, 1\)"),
    (["algorithm.tis_cap=0"], r"algorithm\.tis_cap=0\.0 must be > 0, or null to turn TIS off"),
    (["algorithm.teacher_weights=ema", "algorithm.teacher_ema_rate=0"],
     r"algorithm\.teacher_ema_rate=0\.0 must be in \(0, 1\]"),
])
def test_out_of_range_values_are_config_errors(overrides, message):
    cfg = load_config("examples/configs/cpu_demo.yaml", overrides)
    with pytest.raises(ConfigError, match=message) as error:
        validate_config(cfg, 2, cuda_available=False, te_available=False)
    assert str(error.value).count("\n  - ") == 1  # that problem alone, not others computed from it


def test_every_value_at_its_least_passes():
    validate_config(load_config("examples/configs/cpu_demo.yaml", [
        "train.steps=0", "train.eval_interval=0", "checkpoint.save_interval=0", "checkpoint.keep_last=0",
        "logging.log_interval=1", "optimizer.lr_warmup_steps=0", "algorithm.dual_clip=1.01", "algorithm.clip_low=0",
        "rollout.val_temperature=0", "algorithm.tis_cap=0.5"]), 2, cuda_available=False, te_available=False)
