"""Rollout engines and the weight path from the learner to them.

- `engine`: the `RolloutEngine` interface, `SamplingParams`, `Generation` (log-prob convention)
- `buckets`: `FlatBucket`, bounded buckets of HF tensors (tightly packed, mixed dtypes), and their lifetime
- `fp8`: FP8 rollout weights, block-quantised on the way to an FP8 engine (`rollout.fp8_weights`)
- `resharding`: learner shards → full HF tensors, in buckets (`reshard_to_hf`) or straight into
  an in-process engine's parameters (`write_hf_into`)
- `weight_sync`: `sync_weights`, the call the trainer makes after each optimizer step
- `embedded`: `EmbeddedEngine`, a `transformers` model in-process (CPU default)
- `sglang_engine`: `SGLangEngine` (GPU, colocated, CUDA IPC / NCCL sync); `sglang_requests`: our
  requests and results in SGLang's terms; `sglang_launch`: what an SGLang engine starts from
- `data_parallel`: `DataParallelEngines`, several engines in one process as one
- `separate`: engines on their own ranks (`rollout.placement=separate`): `RemoteEngine`, `serve_engine`;
  `separate_failures`: a failure on either side stops the other at once
- `mismatch`: `MismatchMonitor`, learner vs engine log-prob drift
- `provider`: `create_engine(cfg)` and `sampling_params(cfg.rollout)`
"""

from rlsd_megatron.rollout.buckets import DEFAULT_BUCKET_BYTES, FlatBucket, pack_buckets, plan_buckets
from rlsd_megatron.rollout.engine import EngineHealth, Generation, RolloutEngine, SamplingParams, sample_seed
from rlsd_megatron.rollout.mismatch import LogProbMismatch, LogProbMismatchError, MismatchMonitor, logprob_mismatch
from rlsd_megatron.rollout.provider import create_engine, resolve_backend, sampling_params
from rlsd_megatron.rollout.resharding import reshard_to_hf, write_hf_into
from rlsd_megatron.rollout.weight_sync import SyncStats, sync_weights

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "EngineHealth",
    "FlatBucket",
    "Generation",
    "LogProbMismatch",
    "LogProbMismatchError",
    "MismatchMonitor",
    "RolloutEngine",
    "SamplingParams",
    "SyncStats",
    "create_engine",
    "logprob_mismatch",
    "pack_buckets",
    "plan_buckets",
    "reshard_to_hf",
    "resolve_backend",
    "sample_seed",
    "sampling_params",
    "sync_weights",
    "write_hf_into",
]
