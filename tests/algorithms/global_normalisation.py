"""Reusable check: micro-batch / data-parallel shards with global normalisers reproduce the
full-batch gradient of :func:`rlsd_megatron.algorithms.policy_loss`.

Single-process use (tests/algorithms/test_policy_loss.py): split rows into micro-batches, sum the
shard gradients. Multi-process use (2 gloo ranks): each rank sums ``local_normalisers`` over its
micro-batches, all-reduces (SUM) them into the global counts, computes ``shard_loss_and_grad`` on
its rows, all-reduces (SUM) the gradients, and compares with ``full_batch_loss_and_grad``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlsd_megatron.algorithms import loss_normalisers, policy_loss


def make_batch(seed: int = 0, batch: int = 6, length: int = 7) -> dict[str, torch.Tensor]:
    """A ragged batch (one empty row) whose ratios and advantages exercise every clip branch."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 4
    logp = old + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.6
    adv = torch.randn(batch, 1, generator=g, dtype=torch.float64) * (1 + torch.rand(batch, length, generator=g,
                                                                                         dtype=torch.float64))
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[2] = 0
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return {"logp": logp, "old_logp": old, "token_adv": adv, "mask": mask}


def local_normalisers(batch: dict[str, torch.Tensor],
                      micro_batches: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Sum of :func:`loss_normalisers` over this rank's micro-batches (all-reduce SUM across ranks)."""
    totals = [loss_normalisers(batch["mask"][list(rows)]) for rows in micro_batches]
    return {k: sum(t[k] for t in totals) for k in totals[0]}


def _loss_kwargs(agg: str) -> dict:
    return {"agg": agg, "norm_constant": 7.0 if agg == "seq-mean-token-sum-norm" else None}


def full_batch_loss_and_grad(batch: dict[str, torch.Tensor], agg: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and d loss / d logp of the whole batch, normalised by its own counts."""
    logp = batch["logp"].clone().requires_grad_()
    loss, _ = policy_loss(logp, batch["old_logp"], batch["token_adv"], batch["mask"], **_loss_kwargs(agg))
    loss.backward()
    return loss.detach(), logp.grad


def shard_loss_and_grad(batch: dict[str, torch.Tensor], rows: Sequence[int], agg: str,
                        normalisers: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch (``rows``) with the global ``normalisers``; the gradient is scattered back
    to the full ``[B, T]`` shape (zeros on other rows), so shards' gradients add up."""
    rows = list(rows)
    logp = batch["logp"].clone().requires_grad_()
    loss, _ = policy_loss(logp[rows], batch["old_logp"][rows], batch["token_adv"][rows], batch["mask"][rows],
                          **_loss_kwargs(agg), **normalisers)
    loss.backward()
    return loss.detach(), logp.grad


def split_loss_and_grad(batch: dict[str, torch.Tensor], micro_batches: Sequence[Sequence[int]], agg: str,
                        *, use_global: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and gradient over micro-batches, with (default) or without global normalisers."""
    normalisers = local_normalisers(batch, micro_batches) if use_global else {}
    total_loss = torch.zeros((), dtype=batch["logp"].dtype)
    total_grad = torch.zeros_like(batch["logp"])
    for rows in micro_batches:
        loss, grad = shard_loss_and_grad(batch, rows, agg, normalisers)
        total_loss, total_grad = total_loss + loss, total_grad + grad
    return total_loss, total_grad
