"""Training-state checkpoints of the RL loop on top of `rlsd_megatron.checkpoint`.

A checkpoint holds, besides the model weights (resharded on load to any TP/PP):
- the optimizer (Megatron's sharded optimizer state) and the LR scheduler;
- per rank: torch's CPU (and CUDA) RNG states, Megatron's RNG-tracker states, the teacher
  policy's local copy (frozen / EMA weights) and the KL reference's copy of the initial policy,
  as a `ShardedObject` keyed by global rank: exact resume needs the same learner ranks and layout,
  which `load_training_state` checks (the number of separate engine ranks may change);
- common: step, prompt batches drawn (they number the sampling seeds), the data position;
- with one-step-off-policy (`train.off_policy_steps=1`), the next step's batch, generated while
  this step trained (`OneStepOffPolicy.state_dict`), kept by each replica's host rank.
With `rollout.placement=separate` saves and loads span the learner ranks only (see
`checkpoint.model_checkpoint`): the engine ranks hold nothing to save, and get the weights by the
sync that starts every run.
Frozen models loaded from a path (OPD's teacher, a KL reference checkpoint) are not saved: the
trainer loads them from their path again. Saves are atomic (see `checkpoint.model_checkpoint`);
`resolve_resume` finds the checkpoint to resume from (for `auto`, the latest complete one).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from rlsd_megatron.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from rlsd_megatron.config import CheckpointConfig


# Megatron's distributed-optimizer format that saves each rank's buffers as they are (no
# gathering): it reshards over data parallelism only, and exact resume needs the same layout.
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _rank_state_template(payload=None):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rank_state", payload, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def rng_state() -> dict:
    """torch's CPU (and CUDA) RNG states and Megatron's RNG-tracker states of this rank."""
    from megatron.core import tensor_parallel

    state = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(trainer, root: str | Path) -> Path:
    """Write `trainer`'s full state as iteration `trainer.step` under `root` (collective over the
    learner ranks). With off-policy, `OneStepOffPolicy.settle()` first."""
    learner = trainer.learner
    off_policy = trainer.off_policy
    # Before the first update (a stop during start-up or step 1) torch's Adam has no state yet;
    # its sharded state dict would then lack the keys every load expects.
    learner.init_optimizer_state()
    rank_state = {"rng": rng_state(), "teacher": trainer.teacher.state_dict(), "layout": _layout_key(),
                  "reference": trainer.reference.state_dict() if trainer.reference is not None else None,
                  "off_policy": off_policy.state_dict() if off_policy is not None else None}

    def extra(model_state):
        return {"optimizer": learner.optimizer.sharded_state_dict(model_state, metadata=_OPTIMIZER_FORMAT),
                "rank_state": _rank_state_template(rank_state)}

    common = {
        "step": trainer.step,
        "draws": trainer._draws,
        "scheduler": learner.scheduler.state_dict(),
        "loader": trainer.loader.state_dict(),
        # Every rank's say (the batch itself is only on the hosts): whether loading it is collective.
        "pending_batch": off_policy is not None and off_policy.pending,
    }
    return save_checkpoint(root, learner.model, trainer.cfg, iteration=trainer.step, extra_sharded=extra,
                           extra_common={"trainer": common})


def load_training_state(trainer, path: str | Path) -> int:
    """Restore `trainer` from a checkpoint written by `save_training_state`; returns its step."""
    learner = trainer.learner
    learner.init_optimizer_state()

    def extra(model_state):
        return {"optimizer": learner.optimizer.sharded_state_dict(model_state, is_loading=True,
                                                                  metadata=_OPTIMIZER_FORMAT),
                "rank_state": _rank_state_template()}

    loaded = load_checkpoint(path, learner.model, model=trainer.cfg.model, extra_sharded=extra)
    if "trainer" not in loaded.common:
        raise CheckpointError(f"{loaded.path} holds model weights only (no training state); use "
                              "checkpoint.init_from to start from it instead of resuming")
    with torch.no_grad():  # fp32 main params are views of the (leaf) model params
        learner.optimizer.load_state_dict(loaded.extra["optimizer"])
    rank_state = loaded.extra["rank_state"]
    if rank_state["layout"] != _layout_key():
        raise CheckpointError(
            f"{loaded.path} was written with layout {rank_state['layout']} and this run has {_layout_key()}; exact "
            "resume (RNG, teacher copy, data order) needs the same learner ranks (the world less separate engine "
            "ranks) and parallel layout"
        )
    common = loaded.common["trainer"]
    if common.get("pending_batch") and trainer.off_policy is None:
        raise CheckpointError(f"{loaded.path} was saved by a one-step-off-policy run and holds the rollouts of the "
                              "next step, generated before it; resume it with train.off_policy_steps=1")
    learner.scheduler.load_state_dict(common["scheduler"])
    # Megatron restores Adam's per-parameter step only for fused (apex / TE) Adam; with the
    # torch fallback it stays 0, which changes the bias correction. One optimizer step is one
    # scheduler step, so the scheduler's count is Adam's.
    learner.init_optimizer_state(step=learner.scheduler.num_steps)
    trainer.loader.load_state_dict(common["loader"])
    trainer.teacher.initialize(learner.local_weights())
    trainer.teacher.load_state_dict(rank_state["teacher"])
    if trainer.reference is not None:
        trainer.reference.load_state_dict(rank_state.get("reference"))
    if trainer.off_policy is not None:
        trainer.off_policy.load_state_dict(rank_state.get("off_policy"), pending=bool(common.get("pending_batch")))
    set_rng_state(rank_state["rng"])
    trainer.step, trainer._draws = int(common["step"]), int(common["draws"])
    return trainer.step


def _layout_key() -> dict:
    from megatron.core import parallel_state

    from rlsd_megatron.parallel.state import learner_world_size

    return {
        # The learners': separate engines keep no state (each sample has its own seed), so their number may change.
        "world": learner_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
    }


class ResumePoint(NamedTuple):
    """The checkpoint a run resumes from, and the setting that named it (for messages)."""

    setting: str
    path: Path


def resolve_resume(ckpt: CheckpointConfig) -> ResumePoint | None:
    """The checkpoint this run resumes from and the setting that names it, or None
    to start fresh: `checkpoint.resume=auto` → the latest complete one in `checkpoint.dir` (None
    when nothing is saved yet), a path → that path (not checked here: `train.checkpoint_problems`
    checks it before start-up). Raises CheckpointError when `auto` has no readable directory."""
    if ckpt.resume is None:
        return None
    if ckpt.resume != "auto":
        return ResumePoint(f"checkpoint.resume={ckpt.resume!r}", Path(ckpt.resume))
    if ckpt.dir is None:
        raise CheckpointError("checkpoint.resume=auto needs checkpoint.dir (the root this run saves to and resumes "
                              "from); set checkpoint.dir=DIR or unset checkpoint.resume")
    try:
        latest = latest_checkpoint(ckpt.dir)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint.resume=auto with checkpoint.dir={ckpt.dir!r}: {exc}") from None
    if latest is None:
        return None
    return ResumePoint(f"checkpoint.resume=auto found {latest} (checkpoint.dir={ckpt.dir!r})", latest)


def prune_checkpoints(root: str | Path, *, keep_last: int) -> None:
    """Delete all but the newest `keep_last` iteration directories under `root`."""
    import shutil

    iterations = sorted(p for p in Path(root).glob("iter_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in iterations[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
