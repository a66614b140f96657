"""Long-lived local worker processes joined in one gloo group.

Starting a Python process and importing megatron-core costs ~10 s on a small CPU machine, so
tests and CPU benchmarks do not spawn a world per case: they keep one `LocalProcessPool` of
N ranks alive and send it functions to run on every rank. Each worker has initialised
`torch.distributed` (gloo by default, NCCL for GPU tests; env:// rendezvous at a store the pool
hosts) and, on CPU, installed the compatibility shims once; Megatron's model-parallel layout is set per call (see
`rlsd_megatron.parallel.state.model_parallel`).

A failure on any rank is re-raised in the caller with that rank's traceback. Because the other
ranks may then be stuck in a collective, a failed or timed-out pool is torn down and must be
replaced (`pool.broken` says so).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any, Callable


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for the rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RankFailure(RuntimeError):
    """A function raised on one or more ranks of a `LocalProcessPool`."""


def _worker_main(rank: int, world_size: int, port: int, threads: int, backend, tasks, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        # The parent hosts the rendezvous store (as torchrun's agent does): every rank is a client.
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    if backend == "gloo":
        # A gloo pool is the CPU path, also on a GPU machine: with CUDA visible the CPU shims stay
        # off and every rank would put megatron's buffers on cuda:0, where gloo cannot reduce-scatter.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        import torch

        torch.set_num_threads(threads)
        from rlsd_megatron.parallel.state import init_distributed

        init_distributed(backend=backend)
        results.put((rank, "ready", None))
    except BaseException:  # report start-up failures instead of hanging the parent
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class LocalProcessPool:
    """N spawned processes forming one gloo world; `run(fn, ...)` executes fn on all of them.
    A gloo pool sees no GPU (it is the CPU path); NCCL pools use one GPU per rank.

    `fn` must be importable by the workers (a module-level function) and its arguments and
    return value picklable. Results come back as a list indexed by rank.
    """

    def __init__(self, world_size: int, *, threads_per_rank: int = 1, backend: str = "gloo",
                 start_timeout: float = 180.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.broken = False
        ctx = mp.get_context("spawn")
        from torch.distributed import TCPStore

        # The rendezvous store listens from here on, on a port the OS picked: a port only found
        # free (`free_port`) could be taken by another process during the ranks' ~10 s start-up.
        self._store = TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
        port = self._store.port
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, port, threads_per_rank, backend, self._tasks[rank], self._results),
                daemon=True,
                name=f"rlsd-rank{rank}",
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._collect(start_timeout, what="start-up")

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 300.0, **kwargs: Any) -> list:
        """Run `fn(*args, **kwargs)` on every rank; return the per-rank results."""
        if self.broken:
            raise RuntimeError("this LocalProcessPool failed earlier; create a new one")
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs))
        return self._collect(timeout, what=getattr(fn, "__qualname__", repr(fn)))

    def _collect(self, timeout: float, what: str) -> list:
        import time

        deadline = time.monotonic() + timeout
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(values) + len(errors) < self.world_size:
            try:
                rank, status, payload = self._results.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if errors or dead or time.monotonic() > deadline:
                    self._fail()
                    reason = (
                        f"ranks {sorted(errors)} failed" if errors
                        else f"processes died: {dead}" if dead
                        else f"timed out after {timeout:.0f} s"
                    )
                    raise RankFailure(f"{what}: {reason}\n" + _format_errors(errors)) from None
                continue
            if status == "error":
                errors[rank] = payload
            else:
                values[rank] = payload
        if errors:
            self._fail()
            raise RankFailure(f"{what}: ranks {sorted(errors)} failed\n" + _format_errors(errors))
        return [values[rank] for rank in range(self.world_size)]

    def _fail(self) -> None:
        self.broken = True
        self.close(graceful=False)

    def close(self, graceful: bool = True) -> None:
        """Stop the workers (politely when `graceful`, else kill them)."""
        if graceful and not self.broken:
            for task_queue in self._tasks:
                task_queue.put(None)
            for proc in self._procs:
                proc.join(timeout=30)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)

    def __enter__(self) -> "LocalProcessPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _format_errors(errors: dict[int, str]) -> str:
    return "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(errors.items()))
