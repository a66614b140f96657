"""When the RL loop stops before its last step: a stop signal, or too little time left in the job.

A SLURM job gets a time-limit warning (SIGUSR1) some minutes before its end, but at 70B one
step (thousands of long rollouts) plus a checkpoint save can take longer than that margin: a
step that starts too late ends in TIMEOUT, with nothing saved and no requeue. So besides the
signals, the loop measures its steps and saves and does not start a step that would not finish,
with its save, before the job's end (`RLSD_JOB_END_TIME`, epoch seconds, exported by
slurm/common.sh from SLURM's own end time). Every early stop exits 0 after its checkpoint (a
non-zero status from one rank would make srun kill the others) and writes its reason to
`RLSD_STOP_FILE` when the launcher set it: "time" tells slurm/common.sh to requeue the job.

`StopController` is per-rank bookkeeping; `agreed_stop_reason` is the collective decision every
rank of the run takes together.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from typing import Callable

from rlsd_megatron.parallel.signals import STOP_SIGNALS

JOB_END_VARIABLE = "RLSD_JOB_END_TIME"
STOP_FILE_VARIABLE = "RLSD_STOP_FILE"


class StepAbandoned(Exception):
    """A stop was agreed after the step's generation: the step was rewound to its start (data
    position, sampling-seed count, RNG states) and not trained, so the checkpoint of the previous
    step resumes it exactly."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StopController:
    """Stop signals received and the time budget of the job.

    `install()` makes SIGTERM / SIGUSR1 / SIGUSR2 set `signal_received` instead of killing the
    process (the loop checkpoints at its next safe point); `restore()` puts the previous handlers
    back. `record_step` / `record_save` take measured durations; `out_of_time()` says whether a
    step started now, and its checkpoint save, would end later than `margin_s` before the job's
    end (estimates: the longest of the last `window` measurements, so one slow step counts).
    """

    def __init__(self, *, job_end_time: float | None = None, margin_s: float = 60.0, window: int = 5,
                 clock: Callable[[], float] = time.time):
        self.job_end_time = job_end_time
        self.margin_s = margin_s
        self.clock = clock
        self.signal_received: int | None = None
        self._steps: deque[float] = deque(maxlen=window)
        self._saves: deque[float] = deque(maxlen=window)
        self._previous: dict[int, object] = {}

    @classmethod
    def from_environment(cls, **kwargs) -> "StopController":
        """With the job's end time from `RLSD_JOB_END_TIME` when the launcher set it."""
        value = os.environ.get(JOB_END_VARIABLE)
        if value is None or value == "":
            return cls(**kwargs)
        try:
            return cls(job_end_time=float(value), **kwargs)
        except ValueError:
            raise ValueError(f"{JOB_END_VARIABLE}={value!r} is not a time in seconds since the epoch") from None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        def request_stop(signum, frame):
            self.signal_received = signum

        self._previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def record_step(self, seconds: float) -> None:
        self._steps.append(seconds)

    def record_save(self, seconds: float) -> None:
        self._saves.append(seconds)

    @property
    def step_estimate(self) -> float | None:
        return max(self._steps) if self._steps else None

    @property
    def save_estimate(self) -> float:
        return max(self._saves) if self._saves else 0.0

    def out_of_time(self) -> bool:
        """True when a step started now would, with its save, pass the job's end (less the
        margin). False without an end time or before the first step was measured."""
        if self.job_end_time is None or self.step_estimate is None:
            return False
        needed = self.step_estimate + self.save_estimate + self.margin_s
        return self.clock() + needed > self.job_end_time

    def reason(self) -> str | None:
        """Why the loop should stop now ("SIGUSR1", "time", ...), or None."""
        if self.signal_received is not None:
            return signal.Signals(self.signal_received).name
        return "time" if self.out_of_time() else None


def fault_injection_point(step: int) -> None:
    """Test hook: `RLSD_KILL_AT_STEP=N` SIGKILLs this process after step N's update and before
    its checkpoint (what a node failure mid-step does), for the exact-resume test."""
    if os.environ.get("RLSD_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def run_end_message(reason: str | None, step: int, *, logging_dir: str, checkpoint_dir: str | None) -> str:
    """The console's last line of a run that ended after `step`: done, or why it stopped early
    (`reason`, from `agreed_stop_reason`) and whether a checkpoint was saved."""
    if reason is None:
        where = f"; checkpoints in {checkpoint_dir}" if checkpoint_dir else ""
        return f"done: {step} steps; logs in {logging_dir} (tensorboard --logdir {logging_dir}){where}"
    saved = "checkpoint saved" if checkpoint_dir else "no checkpoint.dir, nothing saved"
    why = "too little time left in the job for another step" if reason == "time" else f"stopped by {reason}"
    return f"{why} after step {step}; {saved}"


def report_stop(reason: str) -> None:
    """Tell the launcher why the run stopped early (one rank calls it, after the checkpoint)."""
    path = os.environ.get(STOP_FILE_VARIABLE)
    if path:
        with open(path, "w") as file:
            file.write(reason + "\n")


def agreed_stop_reason(stop: StopController, *, include_time: bool) -> str | None:
    """Why every rank stops now, or None (collective over the learner ranks, `learner_group`): a stop signal any rank
    received, or (`include_time`) too little time left on any rank's clock."""
    import torch  # not at the top: the launcher imports this module first, to catch signals early
    import torch.distributed as dist

    from rlsd_megatron.parallel.state import learner_group

    mine = stop.reason()
    if mine == "time" and not include_time:
        mine = None
    code = torch.tensor([0.0 if mine is None else 1.0 if mine == "time" else 2.0])
    dist.all_reduce(code, op=dist.ReduceOp.MAX, group=learner_group())
    if code.item() == 0:
        return None
    if code.item() == 1:
        return "time"
    return mine if mine not in (None, "time") else "a stop signal on another rank"
