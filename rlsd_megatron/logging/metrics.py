"""Metrics to tensorboard event files and a console progress line with ETA.

One rank logs (the caller picks it, usually the last pipeline stage where losses live); the
others construct a disabled logger so the call sites stay unconditional.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import time
from pathlib import Path

from rlsd_megatron.config import LoggingConfig

# Shown on the console, in this order, when present; everything goes to tensorboard.
_CONSOLE_KEYS = ("reward/mean", "val/reward", "train/loss", "rlsd/lambda", "train/entropy", "train/grad_norm",
                 "rollout/response_length", "perf/tokens_per_s")


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, *, total_steps: int, enabled: bool):
        self.cfg = cfg
        self.total_steps = total_steps
        self.enabled = enabled
        # (time, step) of the first logged step: the ETA's clock, so that start-up, the warm start
        # and the steps before a resume do not count as training time.
        self._clock: tuple[float, int] | None = None
        self._writer = None
        # Event files already there (an earlier run, or the one this run resumes): tensorboard
        # shows all the files of one directory as one run.
        self.earlier_event_files = sorted(Path(cfg.dir).glob("events.out.tfevents.*")) if enabled else []
        if enabled and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            Path(cfg.dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=cfg.dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write `metrics` at `step` to tensorboard; print a progress line every log_interval."""
        if not self.enabled:
            return
        if self._clock is None:
            self._clock = (time.monotonic(), step)
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step)
        if self.cfg.progress_bar and (step % self.cfg.log_interval == 0 or "val/reward" in metrics):
            print(self._progress_line(step, metrics), file=sys.stderr, flush=True)

    def _progress_line(self, step: int, metrics: dict[str, float]) -> str:
        start_time, start_step = self._clock
        if step > start_step:
            per_step = (time.monotonic() - start_time) / (step - start_step)
            eta = str(datetime.timedelta(seconds=round(per_step * (self.total_steps - step))))
        else:
            eta = "?"
        shown = " ".join(f"{key}={metrics[key]:.4g}" for key in _CONSOLE_KEYS if key in metrics)
        return f"[step {step}/{self.total_steps} {100 * step / self.total_steps:3.0f}% ETA {eta}] {shown}"

    def write_config(self, config: dict) -> None:
        """The run's resolved config as `config.yaml` next to its event files (what produced them)."""
        if self.enabled and self.cfg.tensorboard:
            import yaml

            (Path(self.cfg.dir) / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class PhaseTimer:
    """Wall time per named phase of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
