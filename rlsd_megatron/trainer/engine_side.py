"""This rank's side of the rollout engines for one run: which engine it holds, where the learner's
state is while the engine has the memory, and the weight sync between them.

Which engine: the first rank of each model replica (`replica_group`) hosts one, built in this
process when colocated (`rollout.provider.create_engine`, on the replica's first GPUs) or, with
`rollout.placement=separate`, a `RemoteEngine` handle on an engine rank (`rollout/separate.py`);
the other ranks hold none and only take part in the collectives.

Memory (`train.offload`): the learner's state leaves its device while the engine generates (and
while it starts, since it sizes its memory by what is free), and comes back, the engine asleep,
for the learner's phases (`learner_back`) and for checkpoint saves (`learner_resident`).

Weight sync (`sync`): the engine's weights wake, the learner's stream into them, the learner goes
off its device, and only then does the engine take its KV cache back: a lower peak than waking
both at once. Under separate placement replica 0 alone streams (its rank 0 broadcasts every
bucket to every engine rank; the other replicas report 0 bytes), and every learner waits for
that push before it goes on, so that no replica's next request reaches an engine rank first.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist

from rlsd_megatron.config import Config
from rlsd_megatron.parallel.state import wait_for_every_rank
from rlsd_megatron.rollout.engine import RolloutEngine
from rlsd_megatron.rollout.weight_sync import SyncStats


class EngineSide:
    """The engine handle of this rank (`engine`, None on ranks that host none), the learner's
    `offload` (None without `train.offload`), and what moves between them. `start()` builds or
    connects the engine; `close()` shuts it down."""

    def __init__(self, cfg: Config, learner, *, hosts_engine: bool, dp_rank: int, replica_group):
        from rlsd_megatron.learner.offload import LearnerOffload

        self.cfg, self.learner = cfg, learner
        self.hosts_engine, self.dp_rank, self.replica_group = hosts_engine, dp_rank, replica_group
        self.offload = LearnerOffload(learner, cfg.train.offload) if cfg.train.offload != "none" else None
        self.engine: RolloutEngine | None = None
        self._engines_serving = False  # separate placement: every engine rank seen ready (`sync`)

    def start(self) -> None:
        """Build (colocated) or connect to (separate) this rank's engine, the learner off its device
        meanwhile; returns once every rank's engine is up, with the learner back (loading, the warm
        start and the first sync need it)."""
        from rlsd_megatron.rollout.provider import create_engine

        # The engine takes engine_tp GPUs from the host's own: its replica's first GPUs.
        first_gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0
        if self.offload is not None:  # the engine sizes its memory by what is free when it starts
            self.offload.offload()
        if self.hosts_engine and self.cfg.rollout.placement == "separate":  # a handle on an engine rank
            from megatron.core import parallel_state

            from rlsd_megatron.rollout.separate import remote_engine

            self.engine = remote_engine(self.dp_rank, parallel_state.get_data_parallel_world_size())
        elif self.hosts_engine:
            self.engine = create_engine(self.cfg, base_gpu_id=first_gpu)
        wait_for_every_rank("the rollout engines' start-up")
        if self.offload is not None:
            self.learner_back()

    def learner_back(self) -> None:
        """The engine asleep (its memory released) and the learner on its device (`train.offload`)."""
        if self.engine is not None:
            self.engine.sleep()
        if self.offload is not None:
            self.offload.onload()

    @contextlib.contextmanager
    def learner_resident(self, version: int) -> Iterator[None]:
        """The learner on its device inside (a checkpoint save); when it was off, the engine gets
        weight `version` again afterwards and the learner goes off again."""
        offloaded = self.offload is not None and not self.offload.resident
        if offloaded:
            self.learner_back()
        yield
        if offloaded:  # the engine slept for the save
            self.sync(version)

    def sync(self, version: int) -> SyncStats:
        """Learner weights → this replica's engine as weight `version`; every rank returns the
        host's `SyncStats` (the ranks that log hold no engine)."""
        from rlsd_megatron.rollout.weight_sync import sync_weights

        cfg, stats = self.cfg, None
        if cfg.rollout.placement == "separate" and not self._engines_serving:
            from rlsd_megatron.parallel.state import engine_rank_list
            from rlsd_megatron.rollout.separate_failures import wait_for_engines

            wait_for_engines(engine_rank_list())  # on every learner: an engine that failed to start stops it here
            self._engines_serving = True
        if self.offload is not None and not self.offload.resident:
            self.learner_back()
        engine = self.engine
        if cfg.rollout.placement == "separate":
            # Replica 0 alone streams its weights; its rank 0 broadcasts them to every engine rank.
            engine = self.engine if dist.get_rank() == 0 else None
            if self.dp_rank != 0:
                stats = SyncStats(version, 0, 0, 0.0)  # nothing sent from this replica
        # Other CP ranks' model-parallel groups hold no engine (replica_group), but megatron's
        # expert-parallel group may span CP ranks: with EP every rank takes part in the stream.
        if (self.learner.cp_rank == 0 or cfg.parallel.ep > 1) and stats is None:
            if engine is not None:  # weights first, KV cache after the sync: a lower peak
                engine.wake(["weights"])
            stats = sync_weights(self.learner.model, cfg.model, engine, version=version,
                                 bucket_bytes=cfg.rollout.weight_sync_bucket_mb * 2**20)
        if self.offload is not None:  # before the KV cache takes the memory back
            self.offload.offload()
        if engine is not None:
            engine.wake()
        if cfg.rollout.placement == "separate":
            # The engine ranks take requests in the order they come: no replica may ask for rollouts
            # before rank 0's push of these weights has reached them (else it would get older weights).
            wait_for_every_rank("the weight sync to the engine ranks")
        holder = [stats]
        if dist.get_world_size(self.replica_group) > 1:
            dist.broadcast_object_list(holder, src=dist.get_global_rank(self.replica_group, 0), group=self.replica_group)
        return holder[0]

    def metrics(self) -> dict[str, float]:
        """The last offload's and onload's seconds (`perf/…`); none without `train.offload`."""
        return self.offload.metrics() if self.offload is not None else {}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
