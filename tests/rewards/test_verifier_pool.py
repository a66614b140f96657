"""VerifierPool: isolated workers, per-item limits, replacement, start-up errors, shutdown."""

import os
import time

import pytest

from rlsd_megatron.rewards.verifier_pool import VerifierPool, VerifierPoolError

FNS = "tests.rewards.reward_fns"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a reaped child is gone; a zombie would still be listed
        return f.read().split()[2] != "Z"


def test_workers_are_light_and_isolated():
    with VerifierPool(f"{FNS}:worker_state", num_workers=2, timeout_s=5.0) as pool:
        states = pool.map([(["r", "g"], {})] * 4)
        assert all(o.status == "ok" for o in states)
        # Plain `python -m` workers: the trainer's __main__ (torch, megatron-core) is not re-imported.
        assert all(o.value["torch_loaded"] == 0.0 and o.value["megatron_loaded"] == 0.0 for o in states)
        pids = {int(o.value["reward"]) for o in states}
        assert len(pids) <= 2 and os.getpid() not in pids
    assert not any(_alive(pid) for pid in pids)  # closed and reaped


def test_outcomes_in_order_with_timeouts_and_memory_cap():
    with VerifierPool(f"{FNS}:misbehaving", num_workers=2, timeout_s=1.0) as pool:
        outcomes = pool.map([(["ok", ""], {}), (["hang", ""], {}), (["ok", ""], {})])
        assert [o.status for o in outcomes] == ["ok", "timeout", "ok"]
        assert outcomes[1].seconds >= 1.0 and pool.restarts == 1
    with VerifierPool(f"{FNS}:allocate", num_workers=1, timeout_s=20.0, memory_limit_mb=1024) as pool:
        (outcome,) = pool.map([(["", ""], {})])
        assert outcome.status == "error" and outcome.message.startswith("MemoryError")


def test_start_up_failure_is_a_pool_error():
    pool = VerifierPool("tests.rewards.no_such_module:f", num_workers=1, timeout_s=1.0)
    with pytest.raises(VerifierPoolError, match="verifier workers cannot load 'tests.rewards.no_such_module:f': "
                                                "ModuleNotFoundError"):
        pool.map([(["x", "y"], {})])
    with pytest.raises(VerifierPoolError, match="closed"):
        pool.map([])


def test_argument_checks():
    with pytest.raises(ValueError, match="num_workers=0"):
        VerifierPool(f"{FNS}:length_bonus", num_workers=0, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s=0"):
        VerifierPool(f"{FNS}:length_bonus", num_workers=1, timeout_s=0)


def test_workers_outlive_the_stop_signals_that_slurm_sends_to_the_whole_step():
    """srun delivers a forwarded SIGUSR1 (and a job's SIGTERM) to every process of the step: the
    workers must not die of it (they are stopped by the pool), and the trainer still gets it."""
    import signal

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        with VerifierPool(f"{FNS}:worker_state", num_workers=2, timeout_s=5.0) as pool:
            pids: set[int] = set()
            deadline = time.monotonic() + 60
            while len(pids) < 2 and time.monotonic() < deadline:  # one worker takes every item until the other is up
                pids |= {int(o.value["reward"]) for o in pool.map([(["r", "g"], {})] * 4)}
                time.sleep(0.1)
            assert len(pids) == 2, pids
            for pid in pids:
                for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2):
                    os.kill(pid, sig)
            os.kill(os.getpid(), signal.SIGUSR1)
            after = pool.map([(["r", "g"], {})] * 4)
            assert all(o.status == "ok" for o in after) and pool.restarts == 0
            assert {int(o.value["reward"]) for o in after} <= pids  # the same workers,
            assert all(_alive(pid) for pid in pids)  # all alive
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == [signal.SIGUSR1]
    assert not any(_alive(pid) for pid in pids)  # stopped by the pool on close


def test_stop_signals_blocked_keeps_a_signal_that_arrives_meanwhile():
    import signal
    import threading

    from rlsd_megatron.parallel.signals import stop_signals_blocked

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        with stop_signals_blocked():
            # To this thread: a process-directed signal may go to any thread that does not block it.
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            assert received == []  # pending, not lost
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
