"""`destroy_model_parallel` destroys every group a layout created: switching layouts in one
long-lived process (the test pools, the warm start) must not pile up gloo threads."""

import os

import pytest


def _threads_after_layouts(rounds: int) -> list[int]:
    from rlsd_megatron.parallel.state import model_parallel, new_group

    counts = []
    for _ in range(rounds):
        with model_parallel(tp=2):
            new_group(backend="gloo")  # one of our own, as train.py's error group
        counts.append(len(os.listdir("/proc/self/task")))
    return counts


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_switching_layouts_leaves_no_group_threads(dist_pool):
    for counts in dist_pool(2).run(_threads_after_layouts, 4):
        # Each gloo group runs its own threads; every layout makes about ten groups per rank.
        assert counts[-1] <= counts[0], counts
