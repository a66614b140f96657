"""Global loss normalisation across 2 data-parallel gloo ranks × 2 micro-batches each: the summed
gradient equals the full-batch gradient for every aggregation (float64, within 1e-12)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.algorithms.global_normalisation import (
    full_batch_loss_and_grad,
    local_normalisers,
    make_batch,
    shard_loss_and_grad,
)

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def data_parallel_case() -> dict[str, tuple[float, float]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = make_batch(seed=3, batch=8)
    mine = list(range(rank, 8, world))
    micro_batches = [mine[:2], mine[2:]]
    out = {}
    for agg in AGGREGATIONS:
        normalisers = local_normalisers(batch, micro_batches)
        for value in normalisers.values():
            dist.all_reduce(value)
        loss = torch.zeros((), dtype=torch.float64)
        grad = torch.zeros_like(batch["logp"])
        for rows in micro_batches:
            shard_loss, shard_grad = shard_loss_and_grad(batch, rows, agg, normalisers)
            loss, grad = loss + shard_loss, grad + shard_grad
        dist.all_reduce(loss)
        dist.all_reduce(grad)
        want_loss, want_grad = full_batch_loss_and_grad(batch, agg)
        out[agg] = (float((loss - want_loss).abs()), float((grad - want_grad).abs().max()))
    return out


def test_two_data_parallel_ranks_reproduce_the_full_batch_gradient(dist_pool):
    for per_rank in dist_pool(2).run(data_parallel_case):
        for agg, (loss_diff, grad_diff) in per_rank.items():
            assert loss_diff < 1e-12 and grad_diff < 1e-12, (agg, loss_diff, grad_diff)
