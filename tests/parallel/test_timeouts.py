"""Two timeouts (`parallel.collective_timeout_minutes`, `parallel.wait_timeout_minutes`): a
training collective with a missing rank fails after the short one, while ranks waiting for one
rank's long work alone (generation in the replica group, `wait_for_every_rank`) outlast it.

Scaled down: 2 s for collectives, 30 s for waits, a rank 4 s late."""

import re
import time

import torch
import torch.distributed as dist

SHORT_MIN, LONG_MIN, LATE_S = 2 / 60, 0.5, 4.0


def _late(rank: int, late_rank: int) -> None:
    if rank == late_rank:
        time.sleep(LATE_S)


def _waits_outlast_the_collective_timeout():
    from megatron.core import parallel_state as ps

    from rlsd_megatron.parallel.state import model_parallel, replica_group, wait_for_every_rank

    rank = dist.get_rank()
    seen = {}
    with model_parallel(tp=2, collective_timeout_minutes=SHORT_MIN, wait_timeout_minutes=LONG_MIN):
        # The engine host "generates" for longer than a collective may wait, then broadcasts.
        _late(rank, late_rank=0)
        holder = ["rollouts" if rank == 0 else None]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(replica_group(), 0), group=replica_group())
        seen["broadcast"] = holder[0]
        _late(rank, late_rank=1)
        wait_for_every_rank("generation")
        seen["waited"] = True
        # A training collective (Megatron's TP group) with a rank as late fails after 2 s.
        _late(rank, late_rank=1)
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=ps.get_tensor_model_parallel_group())
            seen["collective"] = "completed"
        except RuntimeError:
            seen["collective"] = "failed"
        seen["collective_s"] = time.monotonic() - started
    return seen


def _missing_rank_is_named():
    from rlsd_megatron.parallel.state import model_parallel, wait_for_every_rank

    rank = dist.get_rank()
    with model_parallel(tp=1, collective_timeout_minutes=1 / 60, wait_timeout_minutes=SHORT_MIN):
        _late(rank, late_rank=1)
        try:
            wait_for_every_rank("generation")
        except RuntimeError as error:
            return str(error)
    return None


def test_long_waits_outlast_the_collective_timeout_which_still_fails_a_late_collective(dist_pool):
    results = dist_pool(2).run(_waits_outlast_the_collective_timeout)
    for seen in results:
        assert seen["broadcast"] == "rollouts" and seen["waited"]
    # Rank 0 arrived on time and gave up after the short timeout, long before the late rank came.
    assert results[0]["collective"] == "failed"
    assert results[0]["collective_s"] < LATE_S, results[0]


def test_wait_timeout_names_the_rank_that_never_came(dist_pool):
    message = dist_pool(2).run(_missing_rank_is_named)[0]
    # torch's monitored_barrier: "Ranks 1 failed to pass monitoredBarrier in 2000 ms".
    assert message is not None and "after generation" in message, message
    assert re.search(r"Ranks? 1 failed to pass", message), message
