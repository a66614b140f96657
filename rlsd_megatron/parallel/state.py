"""Process groups: torch.distributed start-up and megatron-core's model-parallel layout.

Megatron's groups live in `megatron.core.parallel_state`, the replica and waiting groups here;
the rest of the project asks for them and makes none of its own except through `new_group` here.
The backend is chosen once here: NCCL on GPUs, gloo on CPU (with the shims of `cpu_compat`).
Every group this process creates (Megatron's, the replica and waiting groups, `new_group`'s) is
recorded, so `destroy_model_parallel` can destroy them all: torch has no public list of the live
groups to find them by.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlsd_megatron.parallel import cpu_compat


@dataclass(frozen=True)
class Layout:
    """A model-parallel layout: sizes of tensor, pipeline (+ virtual), context and data parallelism,
    and expert parallelism (MoE layers' experts split over `ep` of the data-parallel ranks)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None
    ep: int = 1

    def dp(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp}"
                f" = {model_parallel}; change the parallel layout or the number of processes"
            )
        # Megatron's expert layout is tp x ep x expert-dp x pp (experts use tp as their TP).
        if world_size % (self.tp * self.ep * self.pp):
            raise ValueError(
                f"world size {world_size} is not divisible by tp*ep*pp = {self.tp}*{self.ep}*{self.pp}"
                f" = {self.tp * self.ep * self.pp}; change the parallel layout or the number of processes"
            )
        return world_size // model_parallel


def _env_from_slurm() -> None:
    """Fill torch's env:// variables from SLURM's when launched by `srun` without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            "launched by SLURM without MASTER_ADDR: export MASTER_ADDR (the first node of "
            "$SLURM_JOB_NODELIST) and MASTER_PORT before srun, as slurm/common.sh does"
        )


def launch_rank() -> int:
    """This process's global rank from the launcher's variables (torchrun's, else SLURM's), before
    torch.distributed starts; 0 without a launcher."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def launch_local_rank() -> tuple[int, int]:
    """(this process's rank on its node, the ranks on its node) from the launcher's variables
    (torchrun's, else SLURM's), before torch.distributed starts; (0, 1) without a launcher."""
    local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    # SLURM_NTASKS_PER_NODE is "8" or, on uneven allocations, "8(x2),4"; this node's is SLURM_TASKS_PER_NODE's too.
    local_world = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1")
    return int(local_rank), int(local_world.split("(")[0].split(",")[0])


# On GPUs every group (Megatron's inherit the default's backends) runs CUDA tensors over NCCL and
# CPU tensors over gloo: the trainer reduces CPU scalars (metrics, stop flags, rewards) and
# broadcasts pickled rollouts, which an NCCL-only group refuses.
GPU_BACKEND = "cpu:gloo,cuda:nccl"


def init_distributed(backend: str | None = None, timeout_minutes: float = 60.0) -> str:
    """Initialise torch.distributed from env:// (torchrun or SLURM variables); return the backend.

    `timeout_minutes` is the default (world) group's, where checkpoints are written and read:
    the trainer gives it `parallel.wait_timeout_minutes`.

    With no backend given: `GPU_BACKEND` when CUDA is available, gloo otherwise (then the
    megatron-core compatibility shims are installed). A single process with no launcher
    variables becomes a world of one.
    """
    if backend is None:
        backend = GPU_BACKEND if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        cpu_compat.install()
    if dist.is_initialized():
        return dist.get_backend()
    _env_from_slurm()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from rlsd_megatron.parallel.local_pool import free_port

        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process launch; use torchrun or export it")
        os.environ["MASTER_PORT"] = str(free_port())
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return backend


def initialize_model_parallel(layout: Layout, seed: int = 1234, *, collective_timeout_minutes: float = 10.0,
                              wait_timeout_minutes: float = 60.0, engine_ranks: int = 0) -> None:
    """Create megatron-core's TP/PP/CP/DP groups for `layout`, the replica and waiting groups, and
    seed every RNG per rank.

    Two timeouts (`parallel.*_timeout_minutes`): Megatron's groups, where every collective of a
    training step runs and all ranks arrive within seconds of each other, fail after
    `collective_timeout_minutes`, so that a hung rank is reported (and NCCL's flight recorder
    dumps) soon. Where ranks legitimately wait minutes for one rank's work alone (the engine host
    generating and verifying, the engine starting) they wait in the replica group or in
    `wait_for_every_rank`, gloo groups with `wait_timeout_minutes`.

    Seeds follow Megatron: the default generators get `seed + 100 * pp_rank` (identical across
    TP ranks so that non-parallel regions agree), the tensor-parallel tracker state differs per
    TP rank (`model_parallel_cuda_manual_seed`).

    `engine_ranks` (`rollout.placement=separate`): the world's last ranks host rollout engines and
    join none of these groups; they still call this, because creating a group is collective over
    the world (they are made non-members of every one). Megatron then spans the learner ranks only.
    """
    from megatron.core import parallel_state, tensor_parallel

    global _ENGINE_RANKS
    _ENGINE_RANKS = engine_ranks
    _megatron_optimizer_gathers_over_learners()
    layout.dp(learner_world_size())  # validates divisibility with a clear message
    with _recording_megatron_groups():
        parallel_state.initialize_model_parallel(
            local_world_size=learner_world_size(),
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            context_parallel_size=layout.cp,
            expert_model_parallel_size=layout.ep,
            distributed_timeout_minutes=collective_timeout_minutes,
        )
    seed = seed + (0 if is_engine_rank() else 100 * parallel_state.get_pipeline_model_parallel_rank())
    random.seed(seed)
    torch.manual_seed(seed)
    if not is_engine_rank():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    global _REPLICA_GROUP, _WAIT_GROUP, _WAIT_TIMEOUT
    _WAIT_TIMEOUT = datetime.timedelta(minutes=wait_timeout_minutes)
    _REPLICA_GROUP = _new_replica_group(_WAIT_TIMEOUT)
    _WAIT_GROUP = new_group(list(range(learner_world_size())), backend="gloo", timeout=_WAIT_TIMEOUT)
    global _WEIGHT_BROADCAST_GROUP, _LEARNER_WORLD_GROUP
    # The world's backend: gloo on CPU; on GPUs NCCL for the buckets, gloo for their pickled slot lists.
    _WEIGHT_BROADCAST_GROUP = new_group([0, *engine_rank_list()], timeout=_WAIT_TIMEOUT) if engine_ranks else None
    # The world's backend and timeout (checkpoints run there): the learners' stand-in for the world.
    _LEARNER_WORLD_GROUP = new_group(list(range(learner_world_size())), timeout=_WAIT_TIMEOUT) \
        if engine_ranks else None
    global _SEPARATE_RUN_KEY
    _SEPARATE_RUN_KEY = _agreed_run_key() if engine_ranks else None


_REPLICA_GROUP = None
_WAIT_GROUP = None
_WAIT_TIMEOUT = None
_ENGINE_RANKS = 0
_WEIGHT_BROADCAST_GROUP = None
_LEARNER_WORLD_GROUP = None
_SEPARATE_RUN_KEY = None


def _agreed_run_key() -> str:
    """A key of this layout's own, the same on every rank (collective over the world): it names the
    learners' and engines' entries in the shared store (`rollout/separate_failures.py`), apart from
    those of an earlier layout in the same processes."""
    holder = [uuid.uuid4().hex]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def separate_run_key() -> str | None:
    """This layout's key when engine ranks are separate (`rollout.placement=separate`); None when colocated."""
    return _SEPARATE_RUN_KEY


def wait_timeout() -> datetime.timedelta:
    """`parallel.wait_timeout_minutes`: how long a rank waits for one other rank's long work."""
    if _WAIT_TIMEOUT is None:
        raise RuntimeError("wait_timeout() before initialize_model_parallel()")
    return _WAIT_TIMEOUT


def weight_broadcast_group():
    """Global rank 0 (the sending learner rank) and the engine ranks of `rollout.placement=separate`,
    where the learner's weight buckets are broadcast; None when colocated."""
    return _WEIGHT_BROADCAST_GROUP


def learner_world_size() -> int:
    """The ranks that train (Megatron's world): all of them, less the engine ranks of
    `rollout.placement=separate`."""
    return dist.get_world_size() - _ENGINE_RANKS


def engine_rank_list() -> list[int]:
    """The global ranks hosting separate rollout engines (the world's last ones; empty when colocated)."""
    return engine_ranks_of(dist.get_world_size(), _ENGINE_RANKS)


def engine_ranks_of(world_size: int, engine_ranks: int) -> list[int]:
    """The global ranks that host the `engine_ranks` separate engines of a world of `world_size`: its
    last ones, so that a launcher placing ranks node by node gives them nodes of their own (slurm/common.sh)."""
    return list(range(world_size - engine_ranks, world_size))


def is_engine_rank() -> bool:
    """This process hosts a separate rollout engine and trains nothing."""
    return dist.get_rank() >= learner_world_size()


@contextlib.contextmanager
def learners_are_the_world():
    """Inside, the default (world) group is the learner ranks' (`rollout.placement=separate`): what
    megatron-core and torch.distributed.checkpoint do over "the world" (`group=None`: the optimizer's
    parameter-group gather, `dist_checkpointing.save` / `load`, which take no group) spans the ranks
    that train, and the engine ranks, busy serving requests, take no part. The learners are the
    world's first ranks, so every rank number stays what it is. A no-op when colocated.

    It swaps torch's default group (`_world.default_pg`, what `GroupMember.WORLD` reads), as
    `torch.distributed` offers no public way to run another library's world collectives on a
    subgroup. Only this process's collectives change: the engine ranks never call it."""
    if _LEARNER_WORLD_GROUP is None:
        yield
        return
    from torch.distributed import distributed_c10d

    world = distributed_c10d._world.default_pg
    distributed_c10d._world.default_pg = _LEARNER_WORLD_GROUP
    try:
        yield
    finally:
        distributed_c10d._world.default_pg = world


def _megatron_optimizer_gathers_over_learners() -> None:
    """megatron-core's `get_megatron_optimizer` aligns parameter-group keys across ranks with an
    `all_gather_object` over the whole world (`optimizer._get_param_groups`, once for dense and once
    for expert parameters), which separate engine ranks never join: with engine ranks, that gather
    spans the learner ranks. Installed once; a no-op redirect without engine ranks."""
    from megatron.core import optimizer

    if getattr(optimizer._get_param_groups, "_learners_only", False):
        return
    original = optimizer._get_param_groups

    def gathered_over_learners(*args, **kwargs):
        with learners_are_the_world():
            return original(*args, **kwargs)

    gathered_over_learners._learners_only = True
    optimizer._get_param_groups = gathered_over_learners


def learner_group():
    """The learner ranks' gloo group (the world's when colocated), with `wait_timeout_minutes`:
    where the trainer's world-wide agreements (stop flags) run."""
    if _WAIT_GROUP is None:
        raise RuntimeError("learner_group() before initialize_model_parallel()")
    return _WAIT_GROUP
# The groups this process created and has not destroyed yet (those it is a member of).
_CREATED_GROUPS: list = []


def _recorded(group):
    if group != dist.GroupMember.NON_GROUP_MEMBER:  # ranks outside a group get a placeholder
        _CREATED_GROUPS.append(group)
    return group


def new_group(ranks=None, **kwargs):
    """`torch.distributed.new_group`, recorded so that `destroy_model_parallel` destroys it."""
    return _recorded(dist.new_group(ranks, **kwargs))


def new_pipeline_side_group():
    """A new group of this rank's pipeline-parallel ranks, beside megatron's: for small messages
    between stages that must not queue behind (or block) the schedule's activations there (NCCL
    runs a communicator's operations in order). Created by its members alone, every pipeline group
    at the same time, so ranks outside the learner (separate engine ranks) need not call it."""
    from megatron.core import parallel_state

    ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    group = new_group(ranks, use_local_synchronization=True)
    # NCCL creates a group's communicator at its first collective, which blocks until every member
    # gets there; the stages first use this group at different points of a pipeline schedule (one
    # waiting there for a stage that waits for its activations would hang), so it is created now.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    return group


@contextlib.contextmanager
def _recording_megatron_groups():
    """Record the groups megatron-core creates: it makes every one through
    `parallel_state.create_group`, and its `destroy_model_parallel` forgets them but destroys only
    its gloo data-parallel groups."""
    from megatron.core import parallel_state

    create = parallel_state.create_group
    parallel_state.create_group = lambda *args, **kwargs: _recorded(create(*args, **kwargs))
    try:
        yield
    finally:
        parallel_state.create_group = create


def replica_group():
    """The ranks holding one model replica: TP x CP x PP of this rank's data-parallel index (a
    gloo group with the long `wait_timeout_minutes`: its ranks wait there for their host's rollouts).

    Rollouts are generated once per replica and broadcast over it (every CP rank must train on
    the same sequences). Its first rank (TP, CP and PP rank 0) hosts the replica's engine."""
    if _REPLICA_GROUP is None:
        raise RuntimeError("replica_group() before initialize_model_parallel()")
    return _REPLICA_GROUP


def wait_for_every_rank(what: str) -> None:
    """Block until every rank of the world gets here, for up to `wait_timeout_minutes`.

    Called after work that one rank does alone for minutes (generation, the engine's start-up):
    the ranks then enter the next training collectives together, which lets those run under the
    short `collective_timeout_minutes`. On a timeout the error names the ranks that never came."""
    if _WAIT_GROUP is None:
        raise RuntimeError("wait_for_every_rank() before initialize_model_parallel()")
    if learner_world_size() == 1 or is_engine_rank():
        return
    try:
        # Its own timeout: monitored_barrier's default is the world group's, not its group's.
        dist.monitored_barrier(group=_WAIT_GROUP, timeout=_WAIT_TIMEOUT, wait_all_ranks=True)
    except RuntimeError as error:
        raise RuntimeError(f"waiting for every rank after {what}: {error}") from error


def _new_replica_group(timeout: datetime.timedelta):
    """One gloo group per data-parallel index (collective: every rank creates every group, in order)."""
    from megatron.core import parallel_state

    dp_ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(dp_ranks, None if is_engine_rank() else parallel_state.get_data_parallel_rank())
    mine = None
    for index in sorted({dp for dp in dp_ranks if dp is not None}):
        group = new_group([rank for rank, dp in enumerate(dp_ranks) if dp == index], backend="gloo", timeout=timeout)
        if index == dp_ranks[dist.get_rank()]:  # None on an engine rank: in no replica
            mine = group
    return mine


def destroy_model_parallel() -> None:
    """Tear down Megatron's layout and destroy every group this process created (not the default one).

    megatron-core forgets its groups but does not destroy them, and every gloo group keeps its
    transport threads: a long-lived process that switches layouts (the test pools, the warm
    start) would pile up hundreds of polling threads and saturate the CPUs."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    global _REPLICA_GROUP, _WAIT_GROUP, _ENGINE_RANKS, _WEIGHT_BROADCAST_GROUP, _LEARNER_WORLD_GROUP, _SEPARATE_RUN_KEY
    _REPLICA_GROUP = _WAIT_GROUP = _WEIGHT_BROADCAST_GROUP = _LEARNER_WORLD_GROUP = _SEPARATE_RUN_KEY = None
    _ENGINE_RANKS = 0
    while _CREATED_GROUPS:
        # ValueError: already destroyed (megatron-core destroys its gloo data-parallel groups itself).
        with contextlib.suppress(ValueError):
            dist.destroy_process_group(_CREATED_GROUPS.pop())


@contextlib.contextmanager
def model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None, ep: int = 1, seed: int = 1234,
                   engine_ranks: int = 0, **timeouts: float):
    """Context manager: megatron-core groups for one layout over the current world, torn down after.

    Lets one long-lived set of processes (see `local_pool`) run cases with different layouts.
    `timeouts`: `initialize_model_parallel`'s.
    """
    initialize_model_parallel(Layout(tp=tp, pp=pp, cp=cp, vpp=vpp, ep=ep), seed=seed, engine_ranks=engine_ranks,
                              **timeouts)
    try:
        yield
    finally:
        destroy_model_parallel()
