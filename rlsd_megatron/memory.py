"""Reusing CPU buffers once nothing else uses them.

torch's CPU allocator caches nothing: every large tensor is a fresh mmap whose pages the kernel
zeroes on first touch, which for logits-sized buffers costs more than the arithmetic filling them
(measured in benchmarks/vocab_parallel_ops.py and benchmarks/weight_sync.py). Keeping a buffer and
handing it out again is safe exactly when no tensor views its storage any more.
"""

from __future__ import annotations

import torch


def storage_unshared(base: torch.Tensor) -> bool:
    """No tensor but `base` uses its storage (2 = `base` + the temporary storage object)."""
    try:
        return torch._C._storage_Use_Count(base.untyped_storage()._cdata) <= 2
    except AttributeError:  # private API gone: never reuse
        return False


class CpuBufferCache:
    """Up to `slots` flat CPU buffers, each handed out again once its previous user dropped it;
    new ones get at least `min_numel` elements (e.g. the largest request a stream will make)."""

    def __init__(self, slots: int = 2, min_numel: int = 0):
        self.slots = slots
        self.min_numel = min_numel
        self.buffers: list[torch.Tensor] = []

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat, uninitialised CPU tensor of `numel` elements of `dtype`."""
        for base in self.buffers:
            if base.dtype == dtype and base.numel() >= numel and storage_unshared(base):
                return base[:numel]
        base = torch.empty(max(numel, self.min_numel), dtype=dtype)
        self.buffers = [*self.buffers, base][-self.slots:]
        return base[:numel]

    def clear(self) -> None:
        """Forget every buffer (those still in use stay with their users)."""
        self.buffers.clear()
