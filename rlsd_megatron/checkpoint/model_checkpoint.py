"""Save and load model weights of this rank's chunks with megatron.core.dist_checkpointing.

Collective: every rank of the world calls these with its own chunks (any TP/PP/VPP/DP); with
rollout engines on ranks of their own (`rollout.placement=separate`) every learner rank, the
engines taking no part (`parallel.state.learners_are_the_world`: megatron's `dist_checkpointing`
takes no process group). The
state is the chunks' `sharded_state_dict()` under Megatron-LM's keys (`model`, or `model0`,
`model1`, … with virtual pipeline stages), written in the torch_dist format, so a checkpoint
saved at one layout loads at any other (dist_checkpointing reshards on load) and in Megatron-LM.

The trainer adds its own state through `extra_sharded` (e.g. the optimizer's sharded state,
built from the model's sharded state dict) and `extra_common` (scheduler, RNG, data position);
`load_checkpoint` takes the same kind of `extra_sharded` template and returns what it loaded.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from rlsd_megatron.checkpoint.directory import (
    INFO_FILE,
    CheckpointError,
    CheckpointInfo,
    check_model_matches,
    describe_failure,
    iteration_dir_name,
    partial_dir,
    publish,
    read_checkpoint_info,
    resolve_checkpoint_dir,
    storage_errors,
    write_info,
)
from rlsd_megatron.checkpoint.streaming import COMMON_STATE
from rlsd_megatron.config import Config, ModelConfig, config_to_dict
from rlsd_megatron.dtypes import dtype_name
from rlsd_megatron.parallel.state import learners_are_the_world

ExtraSharded = Mapping[str, Any] | Callable[[dict], Mapping[str, Any]] | None


def model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict:
    """Sharded state dict of this rank's chunks (DDP-wrapped or not) under Megatron-LM's keys."""
    modules = [getattr(chunk, "module", chunk) for chunk in model_chunks]
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": module.sharded_state_dict() for i, module in enumerate(modules)}


def _with_extra(model_state: dict, extra: ExtraSharded, common: Mapping[str, Any] | None = None) -> dict:
    """Model state + extra sharded state + common (plain) state, refusing key collisions."""
    extra = extra(model_state) if callable(extra) else (extra or {})
    common = dict(common or {})
    reserved = set(model_state) | set(COMMON_STATE) | {"iteration"}
    clash = sorted((set(extra) | set(common)) & reserved | (set(extra) & set(common)))
    if clash:
        raise ValueError(f"extra state keys {clash} collide with the model state or each other; rename them")
    return {**model_state, **extra, **common}


def _prepare_megatron_save() -> None:
    """megatron-core 0.19's torch_dist save collects write results through a multiprocessing
    Manager queue, i.e. a long-lived child process: daemonic processes (the workers of
    `parallel.local_pool`) may not start one, and it outlives a trainer killed by SIGKILL,
    holding the launcher's output pipes open. Our saves are synchronous, so results are produced
    and consumed in this process and a thread-safe in-process queue does the same job.
    (Its psutil use is covered by our dependency on psutil.)
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _layout() -> dict[str, Any]:
    from megatron.core import parallel_state

    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    }


def save_checkpoint(root: str | Path, model_chunks: list[torch.nn.Module], cfg: Config, *, iteration: int,
                    release: bool = False, extra_sharded: ExtraSharded = None,
                    extra_common: Mapping[str, Any] | None = None) -> Path:
    """Save the chunks' weights (and any extra state) as `root/iter_XXXXXXX` (or `root/release`)
    and point the tracker at it; returns that directory.

    Written to `<name>.partial` and renamed when complete: a crash mid-save leaves the previous
    checkpoint and the tracker as they were. `extra_sharded` is a dict of megatron sharded
    state, or a function of the model's sharded state dict returning one (what
    `optimizer.sharded_state_dict(model_sd)` needs); `extra_common` is plain picklable state.
    """
    with learners_are_the_world():
        return _save_checkpoint(root, model_chunks, cfg, iteration=iteration, release=release,
                                extra_sharded=extra_sharded, extra_common=extra_common)


def _save_checkpoint(root: Path | str, model_chunks: list[torch.nn.Module], cfg: Config, *, iteration: int,
                     release: bool, extra_sharded: ExtraSharded, extra_common: Mapping[str, Any] | None) -> Path:
    from megatron.core import dist_checkpointing

    root = Path(root)
    name = iteration_dir_name(iteration, release)
    partial, final = partial_dir(root, name), root / name
    state = _with_extra(model_sharded_state_dict(model_chunks), extra_sharded, extra_common)
    state.update(COMMON_STATE, iteration=iteration)
    problem = None
    if dist.get_rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # a previous crashed attempt
            partial.mkdir()
        except OSError as exc:
            problem = f"cannot create {partial}: {exc}"
    _agree(problem)  # also the barrier: nobody writes before the directory exists
    _prepare_megatron_save()
    dist_checkpointing.save(state, str(partial))
    problem = None
    if dist.get_rank() == 0:
        try:
            dtype = next(getattr(model_chunks[0], "module", model_chunks[0]).parameters()).dtype
            info = CheckpointInfo(
                model=config_to_dict(cfg)["model"], iteration=iteration, release=release, layout=_layout(),
                params_dtype=dtype_name(dtype), config=config_to_dict(cfg),
            )
            write_info(partial, info)
            publish(partial, final, tracker_value="release" if release else str(iteration))
        except (OSError, CheckpointError) as exc:
            problem = f"publishing {partial} as {final} failed: {exc}"
    _agree(problem)
    return final


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` read besides the weights it copied into the model."""

    path: Path
    info: CheckpointInfo | None  # None for checkpoints written by Megatron-LM
    iteration: int
    common: dict[str, Any]  # the non-tensor state (extra_common of the save)
    extra: dict[str, Any]  # loaded values of the `extra_sharded` template


def _agree(problem: str | None) -> None:
    """Raise the same CheckpointError on every rank if any rank found a problem."""
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    found = sorted({p for p in problems if p})
    if found:
        raise CheckpointError(" | ".join(found))


def load_checkpoint(path: str | Path, model_chunks: list[torch.nn.Module], *, model: ModelConfig | None = None,
                    extra_sharded: ExtraSharded = None) -> LoadedCheckpoint:
    """Load weights saved at any TP/PP layout into this rank's chunks (in place).

    `path` is a checkpoint root (the tracker's latest) or one iteration directory. With `model`
    given, the architecture recorded in the checkpoint must match it. A checkpoint lacking a
    tensor of the model, holding model tensors the model lacks, or with other shapes raises a
    `CheckpointError` on every rank. After loading into a `Learner`, call
    `learner.optimizer.reload_model_params()` so its fp32 master weights follow.
    """
    with learners_are_the_world():
        return _load_checkpoint(path, model_chunks, model=model, extra_sharded=extra_sharded)


def _load_checkpoint(path: str | Path, model_chunks: list[torch.nn.Module], *, model: ModelConfig | None,
                     extra_sharded: ExtraSharded) -> LoadedCheckpoint:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    problem, checkpoint_dir, info = None, None, None
    try:
        checkpoint_dir = resolve_checkpoint_dir(path)
        if (checkpoint_dir / INFO_FILE).is_file():
            info = read_checkpoint_info(checkpoint_dir)
            if model is not None:
                check_model_matches(info, model, checkpoint_dir)
    except CheckpointError as exc:
        problem = str(exc)
    _agree(problem)

    model_state = model_sharded_state_dict(model_chunks)
    request = _with_extra(model_state, extra_sharded)
    loaded, problem = {}, None
    try:
        loaded, not_requested, absent = dist_checkpointing.load(
            request, str(checkpoint_dir), strict=StrictHandling.RETURN_ALL
        )
        # megatron returns (state, "missing" = stored but not requested, "unexpected" = requested, not stored).
        lacking = sorted(k for k in absent if not k.endswith("_extra_state"))
        surplus = sorted(k for k in not_requested if k.startswith(("embedding.", "decoder.", "output_layer."))
                         and not k.endswith("_extra_state"))
        if lacking or surplus:
            problem = (
                f"checkpoint {checkpoint_dir} does not match the model: "
                + (f"it lacks {lacking[:6]}; " if lacking else "")
                + (f"it has tensors the model does not: {surplus[:6]}" if surplus else "")
            )
    except storage_errors() as exc:  # shape mismatch, truncated files, ...
        problem = (
            f"loading {checkpoint_dir} failed ({describe_failure(exc)}); if a file was "
            f"truncated by an interrupted copy or save, load the previous iteration instead"
        )
    _agree(problem)

    for key, chunk in zip(model_state, model_chunks):
        module = getattr(chunk, "module", chunk)
        missing, unexpected = module.load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{checkpoint_dir}: state dict mismatch after load: missing {missing}, unexpected {unexpected}")
    extra_keys = set(request) - set(model_state)
    common = {k: v for k, v in loaded.items() if k not in request}
    return LoadedCheckpoint(
        path=checkpoint_dir,
        info=info,
        iteration=int(common.get("iteration", info.iteration if info else 0)),
        common=common,
        extra={k: loaded[k] for k in extra_keys if k in loaded},
    )
