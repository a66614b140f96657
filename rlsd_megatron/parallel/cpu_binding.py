"""CPU placement on a GPU node: each training rank on whole cores of its GPU's socket, the engine
host's helper processes (SGLang's scheduler / detokenizer, the verifier workers) on all the node's.

`srun` starts the ranks unbound (`--cpu-bind=none`, slurm/common.sh): SLURM does not know which
GPU a rank drives (each picks cuda:LOCAL_RANK itself), so it cannot keep a rank near its GPU. Here,
where that is known, a rank takes an equal share of the physical cores local to its GPU (the
NUMA node its PCIe root hangs off, from sysfs), shared with the other ranks whose GPUs sit there:
its kernel launches, pinned copies and data work stay on its socket, and the ranks' OpenMP
threads (one per CPU of the share) never share a core. The helper processes work while the
colocated learner is idle (generation, verification), so they start with every CPU of the node,
not the host rank's share, and with the OpenMP thread count of their kind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence

_NODE_CPUS: frozenset[int] | None = None  # the node's CPUs before this rank was bound; None: unbound


def parse_cpu_list(text: str) -> list[int]:
    """Linux's CPU list format ("0-3,8,10-11") as sorted CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return sorted(cpus)


def rank_cpus(node_cpus: Sequence[int], gpu_cpus: Sequence[Sequence[int] | None], local_rank: int,
              core_of: Mapping[int, int] | None = None) -> list[int]:
    """The CPUs of the rank driving GPU `local_rank`: an equal share of the physical cores local
    to that GPU, split with the ranks whose GPUs have the same local CPUs, in GPU order.

    `node_cpus`: the CPUs this job may use on the node. `gpu_cpus[i]`: the CPUs local to GPU i
    (one entry per rank of the node), None where unknown; then the node's CPUs are split over all
    ranks. `core_of`: CPU -> physical core (hyperthread siblings share one), so that a share holds
    whole cores, never only the siblings of another rank's; default: every CPU its own core. With
    fewer cores than ranks, ranks share cores round robin."""
    known = gpu_cpus[local_rank] is not None and set(gpu_cpus[local_rank]) & set(node_cpus)
    if known:
        local = frozenset(gpu_cpus[local_rank])
        peers = [i for i, cpus in enumerate(gpu_cpus) if cpus is not None and frozenset(cpus) == local]
        domain = sorted(local & set(node_cpus))
    else:
        peers, domain = list(range(len(gpu_cpus))), sorted(node_cpus)
    cores: dict[int, list[int]] = {}
    for cpu in domain:
        cores.setdefault(core_of.get(cpu, cpu) if core_of else cpu, []).append(cpu)
    ordered = sorted(cores.values())
    index = peers.index(local_rank)
    share = len(ordered) // len(peers)
    mine = [ordered[index % len(ordered)]] if share == 0 else ordered[index * share:(index + 1) * share]
    return sorted(cpu for core in mine for cpu in core)


def _gpu_local_cpus(device: int) -> list[int] | None:
    """The CPUs local to CUDA device `device` (sysfs `local_cpulist` of its PCI function)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    bus_id = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    try:
        with open(f"/sys/bus/pci/devices/{bus_id}/local_cpulist") as listing:
            return parse_cpu_list(listing.read()) or None
    except OSError:
        return None


def _physical_cores(cpus: Sequence[int]) -> dict[int, int]:
    """CPU -> its core's first hyperthread (from sysfs `thread_siblings_list`)."""
    core_of = {}
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as siblings:
                core_of[cpu] = parse_cpu_list(siblings.read())[0]
        except (OSError, IndexError):
            core_of[cpu] = cpu
    return core_of


def bind_rank_to_gpu_socket(local_rank: int, local_world: int) -> list[int]:
    """Bind this process (and its OpenMP / torch intra-op threads) to its `rank_cpus` share for
    GPU `local_rank`; return the CPUs. Helper processes started later inside
    `helper_process_cpus` get the node's CPUs back."""
    import torch

    global _NODE_CPUS
    node = sorted(os.sched_getaffinity(0))
    gpus = [_gpu_local_cpus(i) if i < torch.cuda.device_count() else None for i in range(local_world)]
    mine = rank_cpus(node, gpus, local_rank, core_of=_physical_cores(node))
    _NODE_CPUS = frozenset(node)
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    os.environ["OMP_NUM_THREADS"] = str(len(mine))
    return mine


@contextlib.contextmanager
def helper_process_cpus(omp_threads: int | None) -> Iterator[None]:
    """Start helper processes inside this block: they inherit the node's CPUs (when this rank was
    bound) and OMP_NUM_THREADS=`omp_threads` (None: this rank's own)."""
    before_cpus = os.sched_getaffinity(0)
    before_omp = os.environ.get("OMP_NUM_THREADS")
    if _NODE_CPUS is not None:
        os.sched_setaffinity(0, _NODE_CPUS)
    if omp_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(omp_threads)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before_cpus)
        if before_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before_omp
