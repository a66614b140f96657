"""CPU placement (parallel/cpu_binding.py): ranks on whole cores of their GPU's socket, helper
processes on the node's CPUs with their own OpenMP thread count."""

import os
import subprocess
import sys

import pytest

from rlsd_megatron.parallel import cpu_binding
from rlsd_megatron.parallel.cpu_binding import helper_process_cpus, parse_cpu_list, rank_cpus

# A DGX H100-like node: 2 sockets x 28 cores x 2 hyperthreads; Linux numbers the second
# hyperthreads after all first ones (socket 0: 0-27,56-83; socket 1: 28-55,84-111); GPUs 0-3
# hang off socket 0, GPUs 4-7 off socket 1.
SOCKET = [parse_cpu_list("0-27,56-83"), parse_cpu_list("28-55,84-111")]
CORE_OF = {cpu: cpu % 56 for cpu in range(112)}
GPUS = [SOCKET[0]] * 4 + [SOCKET[1]] * 4


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("5") == [5]


def test_ranks_get_disjoint_whole_cores_on_their_gpus_socket():
    shares = [rank_cpus(range(112), GPUS, rank, core_of=CORE_OF) for rank in range(8)]
    for rank, cpus in enumerate(shares):
        assert set(cpus) <= set(GPUS[rank]), rank  # its GPU's socket
        cores = {CORE_OF[c] for c in cpus}
        assert len(cores) == 7 and len(cpus) == 14, (rank, cpus)  # 28 cores / 4 ranks, both hyperthreads
    assert shares[0] == list(range(0, 7)) + list(range(56, 63))
    everything = [cpu for cpus in shares for cpu in cpus]
    assert len(everything) == len(set(everything)) == 112  # disjoint and covering the node


def test_job_with_part_of_the_node_splits_what_it_has():
    node = parse_cpu_list("0-13,28-41")  # 14 CPUs per socket, no hyperthread siblings
    shares = [rank_cpus(node, GPUS, rank, core_of=CORE_OF) for rank in range(8)]
    assert shares[0] == [0, 1, 2] and shares[4] == [28, 29, 30]
    assert all(len(cpus) == 3 for cpus in shares)


def test_unknown_topology_splits_the_node_and_few_cores_are_shared_round_robin():
    assert rank_cpus(range(8), [None] * 4, 3) == [6, 7]
    assert [rank_cpus([0, 1], [None] * 4, rank) for rank in range(4)] == [[0], [1], [0], [1]]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell a share from the node")
def test_helper_processes_start_on_the_nodes_cpus_with_their_thread_count(monkeypatch):
    node = sorted(os.sched_getaffinity(0))
    monkeypatch.setattr(cpu_binding, "_NODE_CPUS", frozenset(node))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    probe = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"
    os.sched_setaffinity(0, node[:1])  # this "rank" bound to its share
    try:
        with helper_process_cpus(omp_threads=3):
            child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
        assert child.strip() == f"{node} 3"
        assert os.sched_getaffinity(0) == set(node[:1]) and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        os.sched_setaffinity(0, node)
