"""Rollout engines on their own ranks (`rollout.placement=separate`): the learner's side and the engines'.

The job's last `rollout.engine_ranks` ranks (`parallel.state.engine_rank_list`) each host one
engine (SGLang on its own GPU, or the embedded engine on CPU) and run `serve_engine`: a loop that
takes requests from the learner and never joins Megatron's groups. On the learner, each model
replica's host rank holds a `RemoteEngine`, a `RolloutEngine` whose calls travel to the replica's
engine ranks (`engine_ranks_for`: with fewer engines than replicas, one engine serves several
replicas; with more, each replica splits its batch over several engines), so the trainer drives it
like a colocated engine:

- `generate`: the prompts, sampling parameters and prompt offset go to each of the replica's engine
  ranks (a contiguous share of the prompts each) as one pickled message, point to point over the
  world group; the `Generation`s come back the same way and are put back in prompt order. Each
  engine samples with the per-sample seeds of its prompts' places in the whole batch (the offset of
  its share), so the rollouts equal a colocated engine's.
- `update_weights` (global rank 0 only, the first rank of replica 0, which holds every bucket of
  the resharding stream): each bucket is broadcast over `weight_broadcast_group` (rank 0 and every
  engine rank) — its slot list as a pickled object, then its byte buffer in place. The group has
  the world's backend, so the same code runs over gloo on CPU and NCCL for CUDA buckets. The
  engine rank rebuilds each `FlatBucket` and hands the stream to its engine's `update_weights`, so
  every side holds one bucket at a time.

Messages are a fixed-size header (the body's byte count) received from any rank, then the body
from the header's sender: one engine rank serves several replicas in whatever order they come.
A failure on either side stops the other within seconds (`separate_failures.py`): an engine rank
waits for each message's doorbell in the job's store, where a learner's failure reaches it too.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from rlsd_megatron.rollout.buckets import FlatBucket
from rlsd_megatron.rollout.engine import EngineHealth, Generation, RolloutEngine, SamplingParams
from rlsd_megatron.rollout.separate_failures import (announce_ready, engine_gone, failures_posted, posted_failure,
                                                     ring, wait_for_engines, wait_for_message)

_HEADER_TAG, _BODY_TAG = 71, 72


@dataclass
class Sending:
    """A message on its way (`send_message(wait=False)`): its buffers must live until `wait()`."""

    works: list
    buffers: tuple

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works, self.buffers = [], ()

    def done(self) -> bool:
        return all(work.is_completed() for work in self.works)


def send_message(message: object, dst: int, *, wait: bool = True) -> Sending:
    """Send a picklable `message` to global rank `dst` over the world group's CPU backend. With
    `wait=False` it returns at once: the receiver may take it much later (a reply the learner
    collects at its next step must not block the engine)."""
    body = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
    header = torch.tensor([body.numel()], dtype=torch.int64)
    sending = Sending([dist.isend(header, dst, tag=_HEADER_TAG), dist.isend(body, dst, tag=_BODY_TAG)], (header, body))
    if wait:
        sending.wait()
    return sending


def recv_message(src: int | None = None) -> tuple[int, object]:
    """(sender's global rank, message) of the next message from `src` (None: from any rank)."""
    header = torch.zeros(1, dtype=torch.int64)
    sender = dist.recv(header, src, tag=_HEADER_TAG)
    body = torch.empty(int(header.item()), dtype=torch.uint8)
    dist.recv(body, sender, tag=_BODY_TAG)
    return sender, pickle.loads(body.numpy().tobytes())


@dataclass(frozen=True)
class GenerationReply:
    """An engine rank's answer to one request, with when it worked and how long it had waited for it."""

    generations: list[Generation]
    started: float  # time.time() when generation began (the engine host's clock)
    seconds: float  # generation time
    idle_seconds: float  # the engine's waits for the learner (any message) since its previous generation


@dataclass(frozen=True)
class EngineFailure:
    """An engine rank's error, sent back instead of a result so the learner raises it."""

    engine_rank: int
    message: str


def engine_ranks_for(dp_rank: int, replicas: int, engines: Sequence[int]) -> list[int]:
    """The engine ranks serving data-parallel replica `dp_rank` of `replicas`: with no more engines
    than replicas, one (round robin: replicas share it); with more, every `replicas`-th engine from
    the replica's index (they split its batch)."""
    if len(engines) <= replicas:
        return [engines[dp_rank % len(engines)]]
    return list(engines[dp_rank::replicas])


def _shares(count: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of `parts` contiguous shares of `count` items, sizes differing by at most one."""
    bounds = [count * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _merged(replies: list) -> GenerationReply | EngineFailure:
    """One reply for a request split over engines: the generations in prompt order, the engines'
    common span of work (from the first start to the last end) and their longest idle wait."""
    failures = [reply for reply in replies if isinstance(reply, EngineFailure)]
    if failures:
        return failures[0]
    start = min(reply.started for reply in replies)
    end = max(reply.started + reply.seconds for reply in replies)
    return GenerationReply([g for reply in replies for g in reply.generations], start, end - start,
                           max(reply.idle_seconds for reply in replies))


class RemoteEngine(RolloutEngine):
    """The learner's handle on separate engine ranks (see the module docstring). `engine_ranks`
    generate this replica's rollouts, each a share of every request; with `sends_weights` (global
    rank 0) `update_weights` broadcasts to every engine rank and `shutdown` stops them all.

    `generate` is `submit` then `receive`; between the two the learner is free (one-step-off-policy
    submits step n+1's prompts before training step n). `last_reply` holds the engine's timings of
    the last batch received, `waited_seconds` how long the learner blocked for it: in `receive`, and
    in weight pushes made while it was in flight (they wait for the busy engine to take them).
    """

    backend = "separate"

    def __init__(self, engine_ranks: Sequence[int], engines: Sequence[int], *, weight_group, sends_weights: bool):
        self.engine_ranks = list(engine_ranks)
        self.engines = list(engines)
        self.weight_group = weight_group
        self.sends_weights = sends_weights
        self.weight_version: int | None = None
        # Submitted requests whose replies have not arrived, oldest first: (engine rank, its share's message) each.
        self.in_flight: list[list[tuple[int, Sending]]] = []
        self._arrived: list[tuple[object, float]] = []  # (reply, wait) taken early by `generate`, oldest first
        self.last_reply: GenerationReply | None = None
        self.waited_seconds = 0.0
        self._push_waits = 0.0  # weight pushes' waits for the engines while a request was in flight
        self._serving: set[int] = set()  # the engine ranks seen ready (`_request`)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 prompt_offset: int = 0, images: Sequence[Any] | None = None) -> list[Generation]:
        """Generate now, also while a batch is in flight (validation during off-policy training):
        the engine answers in order, so earlier replies are kept for `receive`."""
        self.submit(prompts, sampling, prompt_offset=prompt_offset, images=images)
        while len(self.in_flight) > 1:
            self._arrived.append(self._take())
        push_waits, self._push_waits = self._push_waits, 0.0  # the waits of the batch in flight stay with it
        generations = self._accept(*self._take())
        self._push_waits = push_waits if self._arrived else 0.0
        return generations

    def submit(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *, prompt_offset: int = 0,
               images: Sequence[Any] | None = None) -> None:
        """Send a generation request (with the prompts' images for a VL policy) and return at once;
        `receive()` returns its results."""
        shares = [(rank, share) for rank, share in zip(self.engine_ranks, _shares(len(prompts), len(self.engine_ranks)))
                  if share[1] > share[0]] or [(self.engine_ranks[0], (0, 0))]
        self.in_flight.append([
            (rank, self._request(("generate", [list(p) for p in prompts[start:stop]], sampling, prompt_offset + start,
                                  images[start:stop] if images is not None else None), rank, wait=False))
            for rank, (start, stop) in shares])

    def _request(self, message: object, engine_rank: int, *, wait: bool) -> Sending:
        """Send `message` to `engine_rank` and ring its doorbell; with `wait`, until it has taken it.
        The first message to an engine rank waits for it to serve: one that failed to start raises
        its error here rather than leave the message unanswered."""
        if engine_rank not in self._serving:
            wait_for_engines([engine_rank])
            self._serving.add(engine_rank)
        sending = send_message(message, engine_rank, wait=False)
        ring(engine_rank)
        if wait:
            try:
                sending.wait()
            except RuntimeError as error:  # gloo: the engine's process is gone
                raise engine_gone(engine_rank, error) from error
        return sending

    def receive(self) -> list[Generation]:
        """The generations of the oldest submitted request not yet received (blocks until they come)."""
        if self._arrived:
            return self._accept(*self._arrived.pop(0))
        if not self.in_flight:
            raise RuntimeError("RemoteEngine.receive() without a submitted request")
        return self._accept(*self._take())

    def _take(self) -> tuple[object, float]:
        """(reply, seconds waited for it) of the oldest request in flight, its engines' replies merged."""
        started, replies = time.perf_counter(), []
        for rank, sending in self.in_flight.pop(0):
            try:
                replies.append(recv_message(rank)[1])
            except RuntimeError as error:  # gloo: the engine's process is gone
                raise engine_gone(rank, error) from error
            sending.wait()
        return _merged(replies), time.perf_counter() - started

    def _accept(self, reply, waited: float) -> list[Generation]:
        self.waited_seconds = waited + self._push_waits
        self._push_waits = 0.0
        if isinstance(reply, EngineFailure):
            raise RuntimeError(f"rollout engine on rank {reply.engine_rank} failed: {reply.message}")
        self.last_reply = reply
        return reply.generations

    def last_batch_metrics(self) -> dict[str, float]:
        """The learner's wait for the last batch, the engine's generation time and idle wait before
        it, and the overlap: the part of the generation the learner did not wait for."""
        reply = self.last_reply
        if reply is None:
            return {}
        overlap = max(reply.seconds - self.waited_seconds, 0.0)
        return {"perf/learner_wait_seconds": self.waited_seconds, "perf/engine_generate_seconds": reply.seconds,
                "perf/engine_wait_seconds": reply.idle_seconds, "perf/overlap_seconds": overlap,
                "perf/overlap_frac": overlap / reply.seconds if reply.seconds > 0 else 0.0}

    def update_weights(self, buckets: Iterable[FlatBucket], version: int) -> None:
        """Broadcast every bucket to every engine rank; returns when the last one is sent."""
        if not self.sends_weights:
            raise RuntimeError(f"update_weights on rank {dist.get_rank()}: only global rank 0 pushes weights to "
                               "separate engines (the other replicas' hosts only generate)")
        started, waited = time.perf_counter(), None
        for engine in self.engines:
            self._request(("weights", version), engine, wait=True)
        for bucket in buckets:
            _broadcast_slots(bucket.packed_slots(), self.weight_group)
            # The first broadcast completes once every engine has joined: until then rank 0 waited for them.
            waited = time.perf_counter() - started if waited is None else waited
            dist.broadcast(bucket.buffer, src=0, group=self.weight_group)
            del bucket
        _broadcast_slots(None, self.weight_group)
        if self.in_flight:
            self._push_waits += waited if waited is not None else time.perf_counter() - started
        self.weight_version = version

    def health(self) -> EngineHealth:
        return EngineHealth(self.backend, ok=True, weight_version=self.weight_version, asleep=False,
                            detail={"engine_ranks": self.engine_ranks})

    def shutdown(self) -> None:
        """Take the replies of requests still in flight (an early stop leaves the next step's), then
        stop the engine ranks (global rank 0). After a posted failure the engine ranks stop by
        themselves, and may no longer answer."""
        if posted_failure() is not None:
            self.in_flight, self.sends_weights = [], False
            return
        while self.in_flight:
            self._take()
        if self.sends_weights:
            for engine in self.engines:
                self._request(("stop",), engine, wait=True)
            self.sends_weights = False  # once


def _broadcast_slots(slots, group) -> list | None:
    holder = [slots]
    dist.broadcast_object_list(holder, src=0, group=group, device=torch.device("cpu"))
    return holder[0]


def received_buckets(group, device: torch.device) -> Iterator[FlatBucket]:
    """The buckets rank 0 broadcasts over `group`, rebuilt on `device`, until its end marker."""
    while (slots := _broadcast_slots(None, group)) is not None:
        bucket = FlatBucket(slots, device)
        dist.broadcast(bucket.buffer, src=0, group=group)
        yield bucket
        del bucket


def _receive_weights(engine: RolloutEngine, group, version: int, device: torch.device) -> str | None:
    """Feed the broadcast stream to `engine`; on an engine error, still take every bucket (the
    sender's broadcasts must complete) and return the error's text."""
    stream = received_buckets(group, device)
    try:
        engine.update_weights(stream, version)
        return None
    except Exception as error:  # reported to the learner with the next request
        for _ in stream:
            pass
        return f"weight sync (version {version}): {type(error).__name__}: {error}"


def serve_engine(engine: RolloutEngine, group) -> int:
    """The engine rank's loop: generate for whichever replica asks, take weight broadcasts from rank
    0, until rank 0 says stop; returns the requests served. An engine error is sent back to the
    replica that asked (a failed weight sync to every later request), never left to hang it; the
    learners' failure raises their `PeerFailure` here."""
    with failures_posted():
        announce_ready()
        return _serve(engine, group)


def _serve(engine: RolloutEngine, group) -> int:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    failure, served, replies, idle = None, 0, [], 0.0
    while True:
        waiting = time.perf_counter()
        wait_for_message(taken=served)  # every message but the last ("stop") is counted in `served`
        sender, message = recv_message()
        idle += time.perf_counter() - waiting
        replies = [sending for sending in replies if not sending.done()]
        op = message[0]
        if op == "stop":
            for sending in replies:  # the learner takes every reply before it stops this rank
                sending.wait()
            return served
        if op == "weights":
            failure = _receive_weights(engine, group, message[1], device)
        elif op == "generate":
            replies.append(send_message(_generate(engine, message, failure, idle), sender, wait=False))
            idle = 0.0
        else:
            raise RuntimeError(f"engine rank {dist.get_rank()} got an unknown request {op!r} from rank {sender}")
        served += 1


def _generate(engine: RolloutEngine, request: tuple, failure: str | None, idle: float) -> GenerationReply | EngineFailure:
    """The reply to one generation request (an `EngineFailure` after a failed weight sync or error)."""
    _, prompts, sampling, offset, images = request
    if failure:
        return EngineFailure(dist.get_rank(), failure)
    started, clock = time.time(), time.perf_counter()
    try:
        generations = engine.generate(prompts, sampling, prompt_offset=offset, images=images)
    except Exception as error:
        return EngineFailure(dist.get_rank(), f"{type(error).__name__}: {error}")
    return GenerationReply(generations, started, time.perf_counter() - clock, idle)


def remote_engine(dp_rank: int, replicas: int) -> RemoteEngine:
    """The `RemoteEngine` of data-parallel replica `dp_rank`'s host rank, one of `replicas` (after
    `initialize_model_parallel(..., engine_ranks=N)`)."""
    from rlsd_megatron.parallel.state import engine_rank_list, weight_broadcast_group

    engines = engine_rank_list()
    return RemoteEngine(engine_ranks_for(dp_rank, replicas, engines), engines, weight_group=weight_broadcast_group(),
                        sends_weights=dist.get_rank() == 0)


def run_engine_rank(cfg) -> int:
    """What an engine rank does for the whole run: build `cfg`'s engine on this rank's GPU (or CPU)
    and serve until the learner stops it; returns the requests served."""
    from rlsd_megatron.parallel.state import weight_broadcast_group
    from rlsd_megatron.rollout.provider import create_engine

    with failures_posted():  # the learners stop at start-up, not at their first request
        engine = create_engine(cfg, base_gpu_id=torch.cuda.current_device() if torch.cuda.is_available() else 0)
    try:
        return serve_engine(engine, weight_broadcast_group())
    finally:
        engine.shutdown()
