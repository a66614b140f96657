"""Persistent worker processes that run a scoring function on untrusted input, one item at a
time, each under a time limit.

Model outputs are untrusted: a LaTeX answer can send sympy into an endless simplification or
eat all memory, and a user's reward function may hang or crash. Such work must not run in the
training process, where it cannot be interrupted (signals only reach the main thread, threads
cannot be killed). :class:`VerifierPool` keeps ``num_workers`` processes alive across steps; an
item still running after ``timeout_s`` has its worker killed (SIGKILL) and replaced, and scores
as a timeout; an exception, or a worker that dies, scores as an error. Neither stops the batch.

Workers are plain ``python -m rlsd_megatron.rewards.verifier_pool`` processes talking over a
socket pair, not ``multiprocessing`` children: a spawned child re-imports the trainer's
``__main__`` (torch, megatron-core: seconds and a GB per worker), a forked one inherits CUDA
and thread state. They get the parent's ``sys.path``, an address-space limit, one OpenMP thread,
ignore SIGINT and start with SLURM's stop signals blocked (`parallel/signals.py`: the trainer
decides when they stop) and exit when the trainer's end of the socket closes or
the trainer process disappears. Messages are JSON, so arguments and results must be JSON values.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from rlsd_megatron.parallel.cpu_binding import helper_process_cpus
from rlsd_megatron.parallel.signals import stop_signals_blocked

__all__ = ["Outcome", "VerifierPool", "VerifierPoolError", "resolve_dotted"]

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class VerifierPoolError(RuntimeError):
    """The pool itself cannot work (a worker failed to start); not a per-item failure."""


@dataclass(frozen=True)
class Outcome:
    """What one item produced: ``status`` ``ok`` (``value`` is the function's JSON result),
    ``timeout`` or ``error`` (``value`` is None, ``message`` says why); ``seconds`` of wall time."""

    status: Literal["ok", "timeout", "error"]
    value: Any = None
    message: str | None = None
    seconds: float = 0.0


def resolve_dotted(path: str) -> Callable:
    """Import ``package.module:attr[.attr]`` and return the attribute (ImportError/AttributeError
    propagate; callers add the user-facing context)."""
    module_name, _, attr_path = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    return obj


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    started: float
    ready: bool = False
    item: int | None = None  # index of the item it is working on
    deadline: float = 0.0
    sent_at: float = 0.0


class VerifierPool:
    """``num_workers`` long-lived processes running ``fn_path`` (``module:function``).

    ``map(items)`` takes ``(args, kwargs)`` pairs of JSON values and returns one
    :class:`Outcome` per item, in order; wall time is at most about
    ``ceil(len(items) / num_workers) · timeout_s`` plus worker restarts. Start-up is
    non-blocking: workers import while the caller does other work; ``map`` waits for them
    (``start_timeout_s``). ``warmup``, an ``(args, kwargs)`` item, is run once by each worker
    before it reports ready, so lazy imports (math-verify's LaTeX parser: ~1 s) do not eat into
    the first real item's time limit. ``memory_limit_mb`` caps each worker's address space (None: no cap).
    Call :meth:`close` (or use ``with``) when done; a forgotten pool is closed at exit.
    """

    def __init__(self, fn_path: str, *, num_workers: int, timeout_s: float, memory_limit_mb: int | None = 2048,
                 warmup: tuple[Sequence[Any], dict[str, Any]] | None = None, start_timeout_s: float = 120.0) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1.")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 seconds (reward.timeout_s).")
        self.fn_path = fn_path
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self.warmup = None if warmup is None else {"args": list(warmup[0]), "kwargs": dict(warmup[1])}
        self.start_timeout_s = start_timeout_s
        self.restarts = 0  # workers replaced after a timeout or crash, for logging
        self._workers: list[_Worker] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    # -- lifecycle ---------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        # One item at a time, single-threaded work: the rank's OMP_NUM_THREADS (its CPU share,
        # slurm/common.sh) would oversubscribe the CPUs the trainer and the engine need.
        env["OMP_NUM_THREADS"] = "1"
        try:
            # A SLURM stop signal is the trainer's, not the worker's; the node's CPUs, not the rank's share.
            with stop_signals_blocked(), helper_process_cpus(omp_threads=None):
                process = subprocess.Popen(
                    [sys.executable, "-m", "rlsd_megatron.rewards.verifier_pool", str(child_sock.fileno())],
                    pass_fds=[child_sock.fileno()], env=env, stdin=subprocess.DEVNULL)
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        conn.send_bytes(json.dumps({"fn": self.fn_path, "sys_path": sys.path,
                                    "memory_limit_mb": self.memory_limit_mb, "warmup": self.warmup}).encode())
        return _Worker(process, conn, started=time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        _kill(worker)
        self._workers[self._workers.index(worker)] = self._start_worker()
        self.restarts += 1

    def close(self) -> None:
        """Stop all workers (EOF first, SIGKILL after a grace period). Idempotent."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- work --------------------------------------------------------------------------------

    def map(self, items: Sequence[tuple[Sequence[Any], dict[str, Any]]]) -> list[Outcome]:
        """Run the function on every ``(args, kwargs)`` item; see the class docstring."""
        if self._closed:
            raise VerifierPoolError("this VerifierPool is closed.")
        outcomes: list[Outcome | None] = [None] * len(items)
        pending = deque(range(len(items)))
        payloads = [json.dumps({"args": list(a), "kwargs": dict(k)}).encode() for a, k in items]
        while pending or any(w.item is not None for w in self._workers):
            now = time.monotonic()
            for worker in self._workers:
                if worker.ready and worker.item is None and pending:
                    worker.item = pending.popleft()
                    worker.sent_at, worker.deadline = now, now + self.timeout_s
                    worker.conn.send_bytes(payloads[worker.item])
            deadlines = [w.deadline for w in self._workers if w.item is not None]
            deadlines += [w.started + self.start_timeout_s for w in self._workers if not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for conn in wait([w.conn for w in self._workers], timeout=wait_s):
                worker = next(w for w in self._workers if w.conn is conn)
                self._receive(worker, outcomes)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.item is not None and now >= worker.deadline:
                    outcomes[worker.item] = Outcome("timeout", message=f"no result within {self.timeout_s:g} s",
                                                    seconds=now - worker.sent_at)
                    self._replace(worker)
                elif not worker.ready and now >= worker.started + self.start_timeout_s:
                    raise VerifierPoolError(f"a verifier worker for {self.fn_path!r} did not start within "
                                            f"{self.start_timeout_s:g} s; the machine may be overloaded.")
        return outcomes  # type: ignore[return-value]

    def _receive(self, worker: _Worker, outcomes: list[Outcome | None]) -> None:
        try:
            message = json.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            try:  # the socket closes as the process dies: give it a moment to report its exit code
                code = worker.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                code = None
            if not worker.ready:
                self.close()
                raise VerifierPoolError(f"a verifier worker for {self.fn_path!r} exited during start-up "
                                        f"(exit code {code}); see its output above.") from None
            if worker.item is not None:
                outcomes[worker.item] = Outcome("error", message=f"worker process died (exit code {code})",
                                                seconds=time.monotonic() - worker.sent_at)
            self._replace(worker)
            return
        kind = message["kind"]
        if kind == "ready":
            worker.ready = True
        elif kind == "init_error":
            self.close()
            raise VerifierPoolError(f"verifier workers cannot load {self.fn_path!r}: {message['message']}")
        else:
            seconds = time.monotonic() - worker.sent_at
            outcomes[worker.item] = Outcome(kind, value=message.get("value"), message=message.get("message"),
                                            seconds=seconds)
            worker.item = None


def _kill(worker: _Worker) -> None:
    worker.process.kill()
    worker.process.wait()
    worker.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.conn.close()  # EOF: an idle worker exits by itself
    deadline = time.monotonic() + 2.0
    for worker in workers:
        try:
            worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
    workers.clear()


# -- worker side ---------------------------------------------------------------------------------


def _limit_memory(megabytes: int | None) -> None:
    if megabytes is None:
        return
    import resource

    limit = megabytes * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(1.0)


def _worker_main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        _serve(conn)
    except (EOFError, OSError):
        pass  # the pool closed the socket (shut down, or gave up on this worker)


def _serve(conn: Connection) -> None:
    init = json.loads(conn.recv_bytes())
    sys.path[:0] = [p for p in init["sys_path"] if p not in sys.path]
    try:
        _limit_memory(init["memory_limit_mb"])
        fn = resolve_dotted(init["fn"])
    except BaseException as exc:
        conn.send_bytes(json.dumps({"kind": "init_error", "message": f"{type(exc).__name__}: {exc}"}).encode())
        return
    if init["warmup"] is not None:
        try:
            fn(*init["warmup"]["args"], **init["warmup"]["kwargs"])
        except Exception:
            pass  # a real item will report the problem
    conn.send_bytes(b'{"kind": "ready"}')
    while True:
        task = json.loads(conn.recv_bytes())
        try:
            reply = json.dumps({"kind": "ok", "value": fn(*task["args"], **task["kwargs"])})
        except BaseException as exc:  # untrusted input: report everything, keep serving
            reply = json.dumps({"kind": "error", "message": f"{type(exc).__name__}: {exc}"[:2000]})
        conn.send_bytes(reply.encode())


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]))
