"""Train/rollout log-prob mismatch: how far the engine's log-probs drift from the learner's.

After each weight sync the trainer has, for every sampled response token, the log-prob the engine
reported when it sampled it and the log-prob the learner computes for the same token with the
same weights (its π_old forward), both under log_softmax(z / T) (`rollout.engine`). Their
difference is pure numerics (kernels, dtype, batch composition) plus any bug in the weight path
— a wrong shard, a stale bucket, a missed tensor show up here first. `MismatchMonitor` reports
mean and max |Δ| over the sampled tokens of the whole batch (all data-parallel ranks when given a
group) and raises `LogProbMismatchError` when the mean exceeds the configured threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class LogProbMismatchError(RuntimeError):
    """The rollout engine's log-probs drifted too far from the learner's."""


@dataclass(frozen=True)
class LogProbMismatch:
    mean_abs: float
    max_abs: float
    tokens: int
    version: int | None = None

    def metrics(self, prefix: str = "rollout/logprob_mismatch_") -> dict[str, float]:
        return {f"{prefix}mean": self.mean_abs, f"{prefix}max": self.max_abs}


def logprob_mismatch(learner: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor | None = None, *,
                     group: dist.ProcessGroup | None = None, version: int | None = None) -> LogProbMismatch:
    """Mean and max |learner − engine| over the tokens where `mask` is true (all when None).

    `learner`, `engine`: log-probs of the same sampled tokens, any equal shapes (e.g. [B, S]
    padded, or 1-D concatenations); `mask`: same shape, true on response tokens. With `group`,
    the statistics cover every rank of it (one all-reduce of sums, one of the max).
    """
    if learner.shape != engine.shape:
        raise ValueError(f"learner log-probs {tuple(learner.shape)} and engine log-probs {tuple(engine.shape)} differ in shape")
    diff = (learner.double() - engine.double().to(learner.device)).abs()
    if mask is not None:
        if mask.shape != diff.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match log-probs {tuple(diff.shape)}")
        diff = diff[mask.to(diff.device).bool()]
    sums = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=diff.dtype, device=diff.device)])
    peak = diff.max() if diff.numel() else torch.zeros((), dtype=diff.dtype, device=diff.device)
    if group is not None:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total, count = float(sums[0]), int(sums[1])
    return LogProbMismatch(total / count if count else 0.0, float(peak), count, version)


class MismatchMonitor:
    """Checks every batch's mismatch against `max_mean` (None: report only).

    `max_mean` is RolloutConfig.max_logprob_mismatch. Typical values: ~1e-6 for fp32 on the same
    kernels, 1e-3–1e-2 for bf16 SGLang vs a bf16 Megatron learner; a broken weight sync gives
    O(1).
    """

    def __init__(self, max_mean: float | None = None):
        if max_mean is not None and max_mean <= 0:
            raise ValueError(f"max_logprob_mismatch must be positive or null, got {max_mean}")
        self.max_mean = max_mean
        self.last: LogProbMismatch | None = None

    def check(self, learner: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor | None = None, *,
              group: dist.ProcessGroup | None = None, version: int | None = None) -> LogProbMismatch:
        stats = logprob_mismatch(learner, engine, mask, group=group, version=version)
        self.last = stats
        if self.max_mean is not None and stats.mean_abs > self.max_mean:
            raise LogProbMismatchError(
                f"rollout log-probs drifted from the learner's after weight sync (version {version}): mean "
                f"|logp_learner - logp_engine| = {stats.mean_abs:.3e} over {stats.tokens} tokens (max {stats.max_abs:.3e}) "
                f"exceeds rollout.max_logprob_mismatch = {self.max_mean:.3e}. Check that the engine got every tensor "
                f"(weight version, resharding errors), that both sides use the same temperature and dtype; raise the "
                f"threshold only if the drift is expected numerics (e.g. bf16 kernels)."
            )
        return stats
