"""Stopping early: StopController (stop signals, the job's time budget; hand-set clock and durations),
and the trainer's stops on 2 gloo ranks (a signal during generation rewinds the step; no step starts
without the time to finish it and save)."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

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


# -- the trainer's stops, in-process on 2 gloo ranks ------------------------------------------------

def run_trainer(tmp: str, name: str, *, steps: int, resume: bool = False, signal_at_generation: int | None = None,
                out_of_time_after: int | None = None) -> dict:
    """One `Trainer.run()` of the tiny test config (tests/trainer/test_resume.py's) into
    `tmp/name`; rank 0 signals itself (SIGUSR1) right after generating step `signal_at_generation`;
    the clock runs past the job's end once step `out_of_time_after` is done."""
    import torch.distributed as dist

    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer
    from tests.trainer.test_resume import TINY

    overrides = [*TINY, f"train.steps={steps}", f"logging.dir={tmp}/logs/{name}", f"checkpoint.dir={tmp}/ckpt",
                 "logging.progress_bar=false"] + (["checkpoint.resume=auto"] if resume else [])
    cfg = load_config("examples/configs/cpu_demo.yaml", overrides)
    os.environ["RLSD_STOP_FILE"] = f"{tmp}/stop-{name}-{dist.get_rank()}"
    try:
        with model_parallel(seed=cfg.train.seed):
            trainer = Trainer(cfg, stop=StopController(
                job_end_time=1000.0, margin_s=0.0,
                clock=lambda: 2000.0 if out_of_time_after is not None and trainer.step >= out_of_time_after else 0.0))
            collect = trainer.collect_rollouts

            def collect_then_signal():
                rollouts = collect()
                if trainer.step == signal_at_generation and dist.get_rank() == 0:
                    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
                return rollouts

            trainer.collect_rollouts = collect_then_signal
            trainer.run()
            final = {name: value.clone() for name, value in trainer.learner.full_state().items()}
    finally:
        del os.environ["RLSD_STOP_FILE"]
    return {"step": trainer.step, "weights": final}


def logged_losses(log_dir) -> dict[int, float]:
    from tests.trainer.test_resume import scalars

    return scalars(log_dir)["train/loss"]


@pytest.mark.slow
def test_stop_signals_during_generation_rewind_the_step_and_resume_is_exact(dist_pool, tmp_path):
    reference = dist_pool(2).run(run_trainer, str(tmp_path / "r"), "r", steps=4)
    # Before the first update: step 1 is rewound, step 0 saved (torch's Adam without state yet).
    first = dist_pool(2).run(run_trainer, str(tmp_path), "s", steps=4, signal_at_generation=1)
    assert [r["step"] for r in first] == [0, 0]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    # Mid-run: step 3 was generated, then rewound, not trained; step 2's checkpoint stays the last.
    second = dist_pool(2).run(run_trainer, str(tmp_path), "t", steps=4, resume=True, signal_at_generation=3)
    assert [r["step"] for r in second] == [2, 2]
    assert sorted(logged_losses(tmp_path / "logs" / "t")) == [1, 2]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (tmp_path / "stop-t-0").read_text() == "SIGUSR1\n" and not (tmp_path / "stop-t-1").exists()

    resumed = dist_pool(2).run(run_trainer, str(tmp_path), "u", steps=4, resume=True)
    want = logged_losses(tmp_path / "r" / "logs" / "r")
    got = {**logged_losses(tmp_path / "logs" / "t"), **logged_losses(tmp_path / "logs" / "u")}
    assert got == want
    for name, value in reference[0]["weights"].items():
        assert torch.equal(value, resumed[0]["weights"][name]), name


def test_no_step_starts_without_the_time_to_finish_it_and_save(dist_pool, tmp_path):
    stopped = dist_pool(2).run(run_trainer, str(tmp_path), "time", steps=4, out_of_time_after=1)
    assert [r["step"] for r in stopped] == [1, 1]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (tmp_path / "stop-time-0").read_text() == "time\n"
