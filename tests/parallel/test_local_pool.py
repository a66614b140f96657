import pytest
import torch
import torch.distributed as dist

from rlsd_megatron.parallel.local_pool import RankFailure


def _rank_and_sum(value):
    tensor = torch.tensor([float(value + dist.get_rank())])
    dist.all_reduce(tensor)
    return dist.get_rank(), tensor.item()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    return "fine"


def test_run_returns_results_by_rank(dist_pool):
    pool = dist_pool(2)
    assert pool.run(_rank_and_sum, 10) == [(0, 21.0), (1, 21.0)]


def test_rank_failure_carries_traceback_and_pool_is_replaced(dist_pool):
    pool = dist_pool(2)
    with pytest.raises(RankFailure, match="deliberate failure on rank 1"):
        pool.run(_fail_on_rank_one)
    assert pool.broken
    assert dist_pool(2).run(_rank_and_sum, 0) == [(0, 1.0), (1, 1.0)]


def _threads_after_layouts(cycles: int) -> int:
    import threading

    from rlsd_megatron.parallel.state import model_parallel

    for _ in range(cycles):
        with model_parallel(tp=2):
            pass
    return threading.active_count(), len(__import__("os").listdir("/proc/self/task"))


def test_switching_layouts_does_not_accumulate_group_threads(dist_pool):
    pool = dist_pool(2)
    pool.run(_threads_after_layouts, 1)
    (_, first), _ = pool.run(_threads_after_layouts, 1)
    (_, later), _ = pool.run(_threads_after_layouts, 5)
    assert later <= first + 2, (first, later)
