"""Failures across `rollout.placement=separate`: when the learner ranks fail (at start-up or later) the
engine ranks stop within seconds with the learners' error, and when an engine rank fails the
learners do, instead of either side waiting for the other until `parallel.wait_timeout_minutes`.

Both sides share the job's rendezvous store (the key-value store every rank of `torch.distributed`
reaches), under this layout's own key (`parallel.state.separate_run_key`):

- `failure`: the first failing rank's error (`post_failure`, first one wins); a rank woken by it
  raises `PeerFailure` with that error.
- `ready/<engine rank>`: the engine rank serves, or failed (`announce_ready`, `post_failure`).
  A learner waits for it before its first message to that rank (`wait_for_engines`), so an engine
  that failed to start is reported rather than sent a message it never takes.
- `bell/<engine rank>/<n>`: message n to that engine rank is on its way (`ring`), or a failure
  elsewhere wakes it. An engine rank waits for its next bell in the store (`wait_for_message`)
  rather than in a receive from any rank, which nothing could interrupt and which gloo never
  fails when a sender dies; its receive then finds the message there.

A learner waits for an engine in a receive from that rank, which gloo fails within a second when
the engine's process is gone; `engine_gone` turns that error into the engine's own posted one. A
process killed outright posts nothing: the launcher ends the job (srun --kill-on-bad-exit, torchrun).
"""

import contextlib
import functools
import json
from typing import Iterator, Sequence

import torch.distributed as dist

from rlsd_megatron.parallel.state import engine_rank_list, is_engine_rank, separate_run_key, wait_timeout

_FAILURE = "failure"
_WAKE = "failure elsewhere"  # a bell's or a ready key's value when a failure rings it


class PeerFailure(RuntimeError):
    """Another rank of the learner/engine pair failed: the message says which rank and what;
    `error_type` is its exception's `module.QualName` and `error` its text."""

    def __init__(self, message: str, error_type: str, error: str):
        super().__init__(message)
        self.error_type, self.error = error_type, error


@functools.lru_cache(maxsize=8)
def _prefixed_store(key: str):
    # torch has no public accessor of the default group's store (the rendezvous one every rank reaches).
    return dist.PrefixStore(f"rlsd/separate/{key}/", dist.distributed_c10d._get_default_store())


def _store():
    """This layout's store, or None when colocated (nothing to share)."""
    key = separate_run_key()
    return _prefixed_store(key) if key is not None else None


def post_failure(error: BaseException) -> None:
    """Tell the other side that this rank failed with `error` and wake the engine ranks (a no-op
    when colocated, and for a `PeerFailure`: that rank's error is the one posted)."""
    store = _store()
    if store is None or isinstance(error, PeerFailure):
        return
    rank, kind = dist.get_rank(), type(error)
    where = f"{'rollout engine' if is_engine_rank() else 'learner'} rank {rank}"
    text = f"{kind.__name__}: {error}" if str(error) else kind.__name__
    store.compare_set(_FAILURE, "", json.dumps({"where": where, "text": text, "error": str(error),
                                                "type": f"{kind.__module__}.{kind.__qualname__}"}))
    if is_engine_rank():  # the learners may still wait for it to start
        store.set(f"ready/{rank}", _WAKE)
    for engine in engine_rank_list():
        if engine != rank:
            ring(engine, _WAKE)


@contextlib.contextmanager
def failures_posted() -> Iterator[None]:
    """Inside, an exception on this rank is posted (`post_failure`) before it propagates."""
    try:
        yield
    except BaseException as error:
        post_failure(error)
        raise


def posted_failure() -> PeerFailure | None:
    """The posted failure as the error to raise here, or None (also when colocated)."""
    store = _store()
    if store is None or not store.check([_FAILURE]):
        return None
    posted = json.loads(store.get(_FAILURE))
    return PeerFailure(f"{posted['where']} failed: {posted['text']}", posted["type"], posted["error"])


def _wait(store, keys: list[str], what: str) -> None:
    """Until every key of `keys` is set; TimeoutError after `parallel.wait_timeout_minutes`."""
    try:
        store.wait(keys, wait_timeout())
    except dist.DistStoreError as error:
        raise TimeoutError(f"rank {dist.get_rank()} waited parallel.wait_timeout_minutes for {what}: {error}") from None


def announce_ready() -> None:
    """This engine rank serves requests now."""
    store = _store()
    if store is not None:
        store.set(f"ready/{dist.get_rank()}", "")


def wait_for_engines(engines: Sequence[int]) -> None:
    """Until every engine rank of `engines` serves; raises the posted failure if one failed."""
    store = _store()
    if store is None:
        return
    _wait(store, [f"ready/{rank}" for rank in engines], "the rollout engine ranks' start-up")
    failure = posted_failure()
    if failure is not None:
        raise failure


def ring(engine_rank: int, value: str = "") -> None:
    """A message to `engine_rank` is on its way (call after sending it), or with `_WAKE` a failure."""
    store = _store()
    if store is not None:
        store.set(f"bell/{engine_rank}/{store.add(f'bells/{engine_rank}', 1)}", value)


def wait_for_message(taken: int) -> None:
    """On an engine rank that has taken `taken` messages: until the next one is on its way; raises
    the posted `PeerFailure` when a failure rings first."""
    store = _store()
    if store is None:
        return
    key = f"bell/{dist.get_rank()}/{taken + 1}"
    _wait(store, [key], "the learners' next request")
    woken = store.get(key).decode() == _WAKE
    store.delete_key(key)
    if woken:
        raise posted_failure()


def engine_gone(engine_rank: int, error: Exception) -> Exception:
    """The error to raise when a receive from (or send to) `engine_rank` failed with `error`: the
    engine's posted failure, else that its process is gone."""
    failure = posted_failure()
    if failure is not None:
        return failure
    return RuntimeError(f"lost rollout engine rank {engine_rank}, which reported no error (was its process killed, "
                        f"or out of memory?): {error}")
