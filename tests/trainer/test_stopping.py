"""StopController: stop signals and the job's time budget (hand-set clock and durations)."""

from __future__ import annotations

import signal
import threading

import pytest

from rlsd_megatron.trainer.stopping import StopController


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_step_is_not_started_when_it_and_its_save_would_pass_the_job_end():
    clock = Clock(1000.0)
    stop = StopController(job_end_time=2000.0, margin_s=60.0, clock=clock)
    assert not stop.out_of_time()  # nothing measured yet: no estimate, keep going
    stop.record_step(300.0)
    stop.record_step(500.0)  # the longest of the recent steps is the estimate
    stop.record_step(200.0)
    stop.record_save(100.0)
    assert stop.step_estimate == 500.0 and stop.save_estimate == 100.0
    clock.now = 2000.0 - 660.0  # 500 + 100 + 60 left: exactly enough
    assert not stop.out_of_time() and stop.reason() is None
    clock.now += 1.0
    assert stop.out_of_time() and stop.reason() == "time"


def test_the_estimate_forgets_steps_older_than_its_window():
    stop = StopController(job_end_time=10_000.0, window=2, clock=Clock(0.0))
    for seconds in (900.0, 100.0, 200.0):
        stop.record_step(seconds)
    assert stop.step_estimate == 200.0


def test_without_an_end_time_only_signals_stop_the_loop():
    stop = StopController(clock=Clock(1e12))
    stop.record_step(1e6)
    assert not stop.out_of_time() and stop.reason() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_stop_signals_are_recorded_not_fatal_and_handlers_restored(sig):
    before = signal.getsignal(sig)
    stop = StopController()
    stop.install()
    try:
        signal.pthread_kill(threading.get_ident(), sig)
        assert stop.signal_received == sig and stop.reason() == sig.name
    finally:
        stop.restore()
    assert signal.getsignal(sig) == before


def test_end_time_from_the_launcher(monkeypatch):
    monkeypatch.setenv("RLSD_JOB_END_TIME", "1765000000")
    assert StopController.from_environment().job_end_time == 1765000000.0
    monkeypatch.setenv("RLSD_JOB_END_TIME", "tomorrow")
    with pytest.raises(ValueError, match="RLSD_JOB_END_TIME='tomorrow' is not a time in seconds"):
        StopController.from_environment()
    monkeypatch.delenv("RLSD_JOB_END_TIME")
    assert StopController.from_environment().job_end_time is None
