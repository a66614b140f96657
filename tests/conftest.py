"""Shared fixtures: long-lived gloo worker pools and the GPU marker.

Distributed tests send module-level functions to `dist_pool(n)`; the pool of n ranks is started
once per test session (megatron-core import costs ~10 s per process) and replaced if a case
fails on some rank.
"""

from __future__ import annotations

import pytest

from rlsd_megatron.parallel.state import GPU_BACKEND

_POOLS: dict[int, object] = {}


@pytest.fixture(scope="session")
def dist_pool():
    """`dist_pool(world_size)` → a `LocalProcessPool` of that many gloo ranks, shared per session."""
    from rlsd_megatron.parallel.local_pool import LocalProcessPool

    def get(world_size: int) -> LocalProcessPool:
        pool = _POOLS.get(world_size)
        if pool is None or pool.broken:
            # Only one pool runs at a time: the machine has 2 cores.
            for other in list(_POOLS):
                _POOLS.pop(other).close()
            pool = _POOLS[world_size] = LocalProcessPool(world_size)
        return pool

    yield get
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m gpu on an H100 with .[gpu] installed)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def gpu_pool():
    """`gpu_pool(world_size)` → a pool of NCCL ranks, one GPU each (GPU tests only)."""
    from rlsd_megatron.parallel.local_pool import LocalProcessPool

    pools: dict[int, LocalProcessPool] = {}

    def get(world_size: int) -> LocalProcessPool:
        import torch

        if torch.cuda.device_count() < world_size:
            pytest.skip(f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
        if world_size not in pools or pools[world_size].broken:
            pools[world_size] = LocalProcessPool(world_size, backend=GPU_BACKEND)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
