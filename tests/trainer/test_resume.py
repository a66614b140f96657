"""Exact resume and tensorboard output, through the real entry point (`torchrun -m
rlsd_megatron.train`, 2 gloo processes).

Run A trains 4 steps uninterrupted. Run B is SIGKILLed after step 3's update, before its
checkpoint (`RLSD_KILL_AT_STEP=3`), so the last checkpoint is step 2; run C resumes it with
`checkpoint.resume=auto`. Steps 3–4 of C must equal A bit for bit: losses, grad norms, rewards,
and every weight of the final checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlsd_megatron.parallel.local_pool import free_port

TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
    "warm_start.max_steps=0", "train.prompts_per_step=4", "rollout.n=4", "train.micro_batch_size=8",
    "reward.custom_fn=tests.trainer.reward_fns:digit_fraction", "optimizer.lr=1e-3", "train.steps=4",
    "train.eval_interval=2", "checkpoint.save_interval=1", "checkpoint.keep_last=5",
    "algorithm.teacher_weights=frozen_sync", "algorithm.teacher_sync_interval=2",
]
# Every scalar the issue asks the logs to carry (a subset of what is written).
EXPECTED_SCALARS = [
    "reward/mean", "reward/reward", "reward/overlong", "rollout/response_length", "rlsd/lambda", "rlsd/delta_mean",
    "rlsd/weight_mean", "train/clip_frac", "train/entropy", "train/approx_kl", "train/grad_norm", "train/lr",
    "rollout/logprob_mismatch_mean", "perf/generate_seconds", "perf/score_seconds", "perf/train_seconds",
    "perf/sync_seconds", "perf/tokens_per_s", "val/reward",
]


def train(tmp: Path, name: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "rlsd_megatron.train", "--config", "examples/configs/cpu_demo.yaml", *TINY,
               f"logging.dir={tmp / 'logs' / name}", *extra]
    return subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def final_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from rlsd_megatron.checkpoint.streaming import read_canonical_tensors
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel

    model = load_config("examples/configs/cpu_demo.yaml", TINY).model
    with model_parallel():
        return dict(read_canonical_tensors(checkpoint, model))


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_is_exact(tmp_path, dist_pool):
    a = train(tmp_path, "a", f"checkpoint.dir={tmp_path / 'a'}")
    assert a.returncode == 0, a.stderr[-3000:]
    b = train(tmp_path, "b", f"checkpoint.dir={tmp_path / 'b'}", env={"RLSD_KILL_AT_STEP": "3"})
    assert b.returncode != 0
    assert (tmp_path / "b" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    c = train(tmp_path, "c", f"checkpoint.dir={tmp_path / 'b'}", "checkpoint.resume=auto")
    assert c.returncode == 0, c.stderr[-3000:]
    assert "resumed from" in c.stderr

    logged_a, logged_c = scalars(tmp_path / "logs" / "a"), scalars(tmp_path / "logs" / "c")
    for tag in EXPECTED_SCALARS:
        assert tag in logged_a, f"tensorboard lacks {tag}; has {sorted(logged_a)}"
    assert sorted(logged_c["train/loss"]) == [3, 4]  # C ran steps 3 and 4 only
    for tag in ("train/loss", "train/grad_norm", "reward/mean", "rlsd/delta_mean", "val/reward"):
        for step in (3, 4):
            if step in logged_a[tag]:
                assert logged_c[tag][step] == logged_a[tag][step], (tag, step)

    weights_a = dist_pool(1).run(final_weights, str(tmp_path / "a" / "iter_0000004"))[0]
    weights_c = dist_pool(1).run(final_weights, str(tmp_path / "b" / "iter_0000004"))[0]
    assert sorted(weights_a) == sorted(weights_c)
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_c[name]), name
