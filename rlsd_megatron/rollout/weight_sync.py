"""One call the trainer makes on every rank after an optimizer step: learner weights → engine.

`sync_weights` runs the resharding stream (a collective over the model-parallel group, see
`rollout.resharding`) and feeds it to this rank's engine — as buckets (SGLang), or written
straight into the parameters of an in-process engine (the embedded one) — or only takes part in
the collectives where the rank hosts none (e.g. ranks 1..N-1 with the embedded CPU engine on
rank 0). It returns what moved and how fast, for the logs and `benchmarks/weight_sync.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from rlsd_megatron.config import ModelConfig
from rlsd_megatron.rollout.buckets import DEFAULT_BUCKET_BYTES, FlatBucket
from rlsd_megatron.rollout.engine import RolloutEngine
from rlsd_megatron.rollout.resharding import reshard_to_hf, write_hf_into


@dataclass(frozen=True)
class SyncStats:
    version: int
    bytes: int  # HF tensor bytes delivered to this rank
    buckets: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def metrics(self, prefix: str = "weight_sync/") -> dict[str, float]:
        return {f"{prefix}seconds": self.seconds, f"{prefix}gb": self.bytes / 1e9, f"{prefix}gb_per_s": self.gb_per_s,
                f"{prefix}buckets": float(self.buckets)}


def _counted(buckets: Iterator[FlatBucket], tally: list[int]) -> Iterator[FlatBucket]:
    for bucket in buckets:
        tally[0] += bucket.nbytes
        tally[1] += 1
        yield bucket
        del bucket


def sync_weights(chunks: list[torch.nn.Module], model: ModelConfig, engine: RolloutEngine | None, *, version: int,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SyncStats:
    """Push the learner's current weights to `engine` as weight `version` (collective over the
    model-parallel group; pass engine=None on ranks that host no engine).

    An in-process engine (`writable_weights()`, the embedded one) is written into directly; any
    other gets the bucket stream through `update_weights`, in the engine's FP8 format if it has one
    (`engine.fp8_format`). Ranks without an engine take part in the collectives only.
    """
    start = time.perf_counter()
    targets = engine.writable_weights() if engine is not None else None
    if engine is None or targets is not None:
        names = write_hf_into(chunks, model, targets)
        if engine is not None:
            engine.weights_written(names, version)
        nbytes = sum(targets[n].numel() * targets[n].element_size() for n in names) if targets else 0
        return SyncStats(version, nbytes, 0, time.perf_counter() - start)
    tally = [0, 0]
    buckets = reshard_to_hf(chunks, model, bucket_bytes=bucket_bytes, fp8=engine.fp8_format)
    engine.update_weights(_counted(buckets, tally), version)
    return SyncStats(version, tally[0], tally[1], time.perf_counter() - start)
