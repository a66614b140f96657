"""Several rollout engines in one process, driven as one (data-parallel fan-out)."""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from rlsd_megatron.rollout.engine import EngineHealth, Generation, RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from rlsd_megatron.rollout.fp8 import Fp8BlockConfig


class DataParallelEngines(RolloutEngine):
    """Several engines in this process as one: prompts split in contiguous shares, generated
    concurrently (one thread per engine), results concatenated in prompt order; every other call
    goes to all of them."""

    backend = "data-parallel"

    def __init__(self, engines: Sequence[RolloutEngine]):
        if not engines:
            raise ValueError("DataParallelEngines needs at least one engine")
        self.engines = list(engines)

    @property
    def fp8_format(self) -> Fp8BlockConfig | None:
        """The engines' common weight format (they all receive the same buckets)."""
        formats = {engine.fp8_format for engine in self.engines}
        if len(formats) > 1:
            raise ValueError(f"the engines expect different weight formats ({formats}); one bucket stream "
                             "cannot feed them all")
        return formats.pop()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 prompt_offset: int = 0, images: Sequence | None = None) -> list[Generation]:
        shares = _split(len(prompts), len(self.engines))
        results: list = [None] * len(self.engines)
        errors: list = []

        def run(k: int, start: int, stop: int) -> None:
            try:
                share = {"images": images[start:stop]} if images is not None else {}
                results[k] = self.engines[k].generate(prompts[start:stop], sampling, prompt_offset=prompt_offset + start,
                                                      **share)
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(k, a, b)) for k, (a, b) in enumerate(shares) if b > a]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return [g for out in results if out for g in out]

    def update_weights(self, buckets: Iterable, version: int) -> None:
        """Every engine receives every bucket, concurrently (one thread each). The next bucket is
        drawn only when all engines are done with the current one, so the producer's extra memory
        stays at one bucket, as the interface promises it."""
        inboxes = [_Inbox() for _ in self.engines]
        errors: list = []

        def consume(engine: RolloutEngine, inbox: _Inbox) -> None:
            stream = inbox.stream()
            try:
                engine.update_weights(stream, version)
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)
            finally:
                stream.close()
                inbox.discard_rest()  # the producer must never wait on an engine that stopped reading

        threads = [threading.Thread(target=consume, args=pair) for pair in zip(self.engines, inboxes)]
        for t in threads:
            t.start()
        try:
            for bucket in buckets:
                for inbox in inboxes:
                    inbox.queue.put(bucket)
                del bucket
                for inbox in inboxes:
                    inbox.queue.join()
                if errors:
                    break
        finally:
            for inbox in inboxes:
                inbox.queue.put(_END)
            for t in threads:
                t.join()
        if errors:
            raise errors[0]

    def sleep(self) -> None:
        for engine in self.engines:
            engine.sleep()

    def wake(self, tags: Sequence[str] | None = None) -> None:
        for engine in self.engines:
            engine.wake(tags)

    def flush_cache(self) -> None:
        for engine in self.engines:
            engine.flush_cache()

    def health(self) -> EngineHealth:
        healths = [engine.health() for engine in self.engines]
        versions = {h.weight_version for h in healths}
        return EngineHealth(self.backend, ok=all(h.ok for h in healths) and len(versions) == 1,
                            weight_version=versions.pop() if len(versions) == 1 else None,
                            asleep=any(h.asleep for h in healths), detail={"engines": len(healths)})

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.shutdown()


_END = object()


class _Inbox:
    """One engine's view of the shared bucket stream. A bucket is marked done (`task_done`)
    when the engine asks for the next one or stops reading."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.ended = False

    def stream(self) -> Iterator:
        while (bucket := self.queue.get()) is not _END:
            try:
                yield bucket
            finally:
                del bucket
                self.queue.task_done()
        self.ended = True
        self.queue.task_done()

    def discard_rest(self) -> None:
        while not self.ended:
            self.ended = self.queue.get() is _END
            self.queue.task_done()


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for k in range(parts):
        stop = start + base + (k < extra)
        bounds.append((start, stop))
        start = stop
    return bounds
