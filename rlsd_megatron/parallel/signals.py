"""The stop signals of a SLURM job reach the trainer only, never its helper processes.

SLURM delivers a signal forwarded by `srun` (the time-limit warning, `scancel --signal`) to *every*
process of the job step, not only to the task it started: SGLang's scheduler / detokenizer
processes and the verifier workers would get it too. Their default action for SIGUSR1 and
SIGTERM is to die, after which the engine host's next request fails or hangs and the warning that
was meant to save a checkpoint ends the job without one.

Child processes are therefore started with these signals *blocked*: the signal mask survives
fork and exec (Python's subprocess and multiprocessing's spawn keep it), so every descendant
starts with them blocked and never acts on them, whatever handlers it installs, while the trainer
(which unblocks them as soon as its children exist) handles them. Blocking rather than ignoring
loses nothing: a signal that arrives while the children start stays pending in the trainer and is
delivered when the block ends. The children are stopped by the trainer (EOF, SIGKILL), never by
these signals.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2})


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Start child processes inside this block: they (and their descendants) inherit
    `STOP_SIGNALS` blocked. The caller's thread gets them again, pending ones included, on exit.
    Call it from the thread that creates the processes (the mask is per thread)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
