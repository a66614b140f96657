"""Memory contract: no full-vocabulary or [tokens, V_local] temporaries, only chunk-sized ones.

A dispatch mode records every tensor an aten op newly allocates during forward and backward.
Apart from the gradients themselves (one [tokens, V_local] tensor per logits argument, which any
backward must return), nothing may exceed one [chunk, V_local] buffer.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlsd_megatron import ops

T, V, CHUNK, K = 64, 64, 8, 4


class AllocationRecorder(TorchDispatchMode):
    """Records (op, shape, dtype) of every tensor an aten op returns in fresh storage."""

    def __init__(self):
        super().__init__()
        self.allocations: list[tuple[str, tuple, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.allocations.append((str(func), tuple(t.shape), t.dtype))
        return out


@pytest.fixture(autouse=True)
def fresh_gradient_cache():
    """Every test starts with no CPU gradient storage to reuse, so each gradient is one allocation."""
    from rlsd_megatron.ops.vocab_shard import release_cached_gradients

    release_cached_gradients()


OPS = {
    "log_prob+entropy": lambda s, t, y, ids: sum(ops.token_log_probs(s, y, return_entropy=True, chunk_size=CHUNK)),
    "log_probs_at_ids": lambda s, t, y, ids: ops.log_probs_at_ids(s, ids, chunk_size=CHUNK),
    "kl": lambda s, t, y, ids: ops.kl_divergence(s, t, chunk_size=CHUNK),
    "jsd": lambda s, t, y, ids: ops.generalized_jsd(s, t, beta=0.4, chunk_size=CHUNK),
    "topk": lambda s, t, y, ids: ops.vocab_topk(s, K)[0],
    "distill_sdpo": lambda s, t, y, ids: ops.topk_distillation_loss(
        s, t, K, support="student", divergence="jsd", tail_bucket=True, chunk_size=CHUNK),
}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_chunk_sized_temporaries(name, dtype):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(T, V, generator=gen).to(dtype).requires_grad_(True)
    teacher = torch.randn(T, V, generator=gen).to(dtype).requires_grad_(True)
    target = torch.randint(0, V, (T,), generator=gen)
    ids = torch.randint(0, V, (T, K), generator=gen)
    recorder = AllocationRecorder()
    with recorder:
        OPS[name](student, teacher, target, ids).sum().backward()
    grads = [a for a in recorder.allocations if torch.Size(a[1]).numel() == T * V and a[2] == dtype]
    too_big = [a for a in recorder.allocations if torch.Size(a[1]).numel() > CHUNK * V and a not in grads]
    assert not too_big, f"temporaries larger than one [{CHUNK}, {V}] chunk: {too_big}"
    n_grads = 2 if name in ("kl", "jsd", "distill_sdpo") else 1
    assert len(grads) == n_grads, f"expected {n_grads} [T, V_local] gradient(s), got {grads}"


def test_cpu_gradients_reuse_only_storage_nobody_holds():
    gen = torch.Generator().manual_seed(2)
    target = torch.randint(0, V, (T,), generator=gen)
    logits = [torch.randn(T, V, generator=gen).requires_grad_(True) for _ in range(3)]
    ops.token_log_probs(logits[0], target, chunk_size=CHUNK).sum().backward()
    held, expected = logits[0].grad, logits[0].grad.clone()
    ops.token_log_probs(logits[1], target, chunk_size=CHUNK).sum().backward()
    assert logits[1].grad.data_ptr() != held.data_ptr()  # logits[0].grad still uses it
    freed = logits[1].grad.data_ptr()
    logits[1].grad = None
    ops.token_log_probs(logits[2], target, chunk_size=CHUNK).sum().backward()
    assert logits[2].grad.data_ptr() == freed  # dropped: reused, no fresh allocation
    assert torch.equal(held, expected)


def test_transposed_logits_are_not_copied():
    """[B, S, V] views of Megatron's [S, B, V] logits are processed in storage order, not copied."""
    gen = torch.Generator().manual_seed(1)
    seq_first = [torch.randn(T // 4, 4, V, generator=gen).requires_grad_(True) for _ in range(3)]
    batch_first = [z.transpose(0, 1) for z in seq_first]
    target = torch.randint(0, V, (4, T // 4), generator=gen)
    recorder = AllocationRecorder()
    with recorder:
        lp, ent = ops.token_log_probs(batch_first[0], target, return_entropy=True, chunk_size=CHUNK)
        kl = ops.kl_divergence(*batch_first[1:], chunk_size=CHUNK)
        (lp.sum() + ent.sum() + kl.sum()).backward()
    too_big = [a for a in recorder.allocations if torch.Size(a[1]).numel() > CHUNK * V]
    assert len(too_big) == 3, f"expected only the 3 gradients to be [T, V_local]-sized: {too_big}"
    copies = [z.detach().contiguous().clone().requires_grad_(True) for z in batch_first]
    want_lp, want_ent = ops.token_log_probs(copies[0], target, return_entropy=True, chunk_size=CHUNK)
    want_kl = ops.kl_divergence(*copies[1:], chunk_size=CHUNK)
    (want_lp.sum() + want_ent.sum() + want_kl.sum()).backward()
    for got, want in [(lp, want_lp), (ent, want_ent), (kl, want_kl)]:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for z, c in zip(seq_first, copies):
        torch.testing.assert_close(z.grad.transpose(0, 1), c.grad, rtol=1e-6, atol=1e-7)
