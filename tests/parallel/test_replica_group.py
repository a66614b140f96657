"""`replica_group()`: the TP x CP x PP ranks of one data-parallel index, first rank the engine host."""

import pytest
import torch.distributed as dist


def _replica(tp, pp, cp):
    from megatron.core import parallel_state as ps

    from rlsd_megatron.parallel.state import model_parallel, replica_group

    with model_parallel(tp=tp, pp=pp, cp=cp):
        group = replica_group()
        members = sorted(dist.get_process_group_ranks(group))
        host = dist.get_rank(group) == 0
        coordinates = (ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(),
                       ps.get_pipeline_model_parallel_rank())
        return ps.get_data_parallel_rank(), members, host, coordinates


@pytest.mark.parametrize("tp, pp, cp", [(1, 1, 2), (2, 1, 2), (1, 2, 2), (2, 2, 1)])
def test_replica_is_every_rank_of_one_data_parallel_index(dist_pool, tp, pp, cp):
    results = dist_pool(4).run(_replica, tp, pp, cp)
    for rank, (dp, members, host, coordinates) in enumerate(results):
        # Independent reference: the ranks reporting the same data-parallel rank.
        assert members == [r for r, other in enumerate(results) if other[0] == dp], (rank, members)
        assert len(members) == tp * pp * cp
        assert host == (coordinates == (0, 0, 0))
