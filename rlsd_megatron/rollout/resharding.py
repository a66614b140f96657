"""Learner (TP/PP-sharded Megatron) → full Hugging Face tensors, streamed in bounded buckets.

The one weight path from the learner to any rollout engine (SGLang over CUDA IPC or NCCL, the
embedded CPU engine). `reshard_to_hf(chunks, model)` is a collective over the model-parallel
group (every TP and PP rank of one data-parallel replica calls it) that yields, on every one of
those ranks, the same sequence of `FlatBucket`s (`rollout.buckets`) holding the full HF tensors
of the whole model:

1. plan (one small object all-gather over PP): every stage says which canonical parameters it
   owns (`models.sharding` layouts, read from Megatron's parameter attributes) and every rank
   checks the union against the family's HF mapping (`models.hf_mapping`) before any tensor
   moves: an unmapped parameter, a missing one or a wrong shape raises `MappingError` naming it;
2. for each parameter in checkpoint order, the owning stage gathers its TP shards (NCCL
   all-gather; on gloo one async broadcast per rank — 2-4x faster than gloo's all-gather here —
   issued one parameter ahead so the transfer overlaps the copies) and, with
   PP, broadcasts them over the PP group — so every stage holds every tensor in turn, which is
   what colocated engines need (each GPU hands its own engine TP rank a full copy over CUDA IPC).
   Tied output copies on the last stage are skipped (HF ties `lm_head` to the embedding);
3. `megatron_to_hf` splits fused QKV (grouped-query layout) and SwiGLU fc1 into HF tensors. It is
   applied to each TP shard with the shard's own head counts, and the shards' HF pieces are
   written straight into the bucket at their offsets along the TP dimension: one copy, no
   concatenated full tensor, vocabulary padding cut off on the way. That equals
   `megatron_to_hf(unshard_tensors(shards))` whenever the shard layout is contiguous per rank
   (stride 1; SwiGLU fc1's stride 2 with its gate/up halves); anything else takes that reference
   path (`tests/rollout/test_resharding_pieces.py` checks both agree);
4. MoE experts (`models.sharding`: expert j of a layer lives on one expert-parallel rank, split
   over the expert-TP group) are planned over the EP group too: the owning EP rank gathers an
   expert's expert-TP shards, then broadcasts them over the EP group (before the PP broadcast),
   so every rank of the EP group streams every expert under its HF per-expert names
   (`mlp.experts.{j}.gate_proj/up_proj/down_proj`, what SGLang's Qwen3-MoE and Qwen2-MoE loaders
   read). The EP group spans data-parallel replicas, so all of them sync together (as the trainer does);
5. for an FP8 engine (the `fp8` argument, see `rollout.fp8`), each projection weight is assembled
   whole (its TP pieces concatenated: a block's scale needs its rows from every shard) and
   written as its fp8 tensor followed by its `weight_scale_inv`.

Memory: one bucket (`rollout.buckets`) plus two parameters' shards in reused scratch buffers
(the next parameter's TP gather overlaps the copies of the current one); with FP8, a few fp32
copies of one projection weight while it is quantised.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.distributed as dist

from rlsd_megatron.config import ModelConfig
from rlsd_megatron.models.hf_config import head_dim
from rlsd_megatron.models.hf_mapping import MappingError, expected_hf_shapes, megatron_to_hf, name_pairs
from rlsd_megatron.models.sharding import (
    ShardLayout,
    is_tied_output_copy,
    local_parameters,
    shard_layout,
    unshard_tensors,
)
from rlsd_megatron.rollout.buckets import (
    DEFAULT_BUCKET_BYTES,
    FlatBucket,
    TensorSlot,
    bucket_buffers,
    packed_bytes,
    plan_buckets,
    write_pieces,
)
from rlsd_megatron.rollout.fp8 import Fp8BlockConfig, fp8_rollout_specs, fp8_rollout_tensors, is_fp8_weight


@dataclass(frozen=True)
class ParamInfo:
    """One canonical Megatron parameter as the whole model-parallel group sees it."""

    name: str
    stage: int  # pipeline rank that owns it
    layout: ShardLayout
    local_shape: tuple[int, ...]  # one TP shard (vocabulary padded)
    full_shape: tuple[int, ...]  # canonical: TP-gathered, vocabulary unpadded
    dtype: torch.dtype
    kind: str  # hf_mapping rule kind: copy / qkv / gate_up
    hf: tuple[tuple[str, tuple[int, ...]], ...]  # HF names and shapes it becomes
    expert_rank: int | None = None  # an MoE expert's: the expert-parallel rank that holds it


def _canonical_shape(layout: ShardLayout, local_shape: tuple[int, ...], tp: int, vocab_size: int) -> tuple[int, ...]:
    shape = list(local_shape)
    if layout.tp_dim is not None:
        shape[layout.tp_dim] *= tp
    if layout.vocab:
        shape[0] = vocab_size
    return tuple(shape)


def _implied_megatron_shape(kind: str, hf_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if kind == "copy":
        return hf_shapes[0]
    return (sum(s[0] for s in hf_shapes), *hf_shapes[0][1:])  # qkv / gate_up: stacked rows


def plan_stream(chunks: list[torch.nn.Module], model: ModelConfig) -> list[ParamInfo]:
    """Every canonical parameter of the model in checkpoint order, with its owner stage and HF
    targets; validated against the family mapping (collective over the PP group)."""
    from megatron.core import parallel_state

    mine = []
    for module, local_name, param in local_parameters(chunks):
        if not is_tied_output_copy(module, local_name):
            layout = shard_layout(module, local_name, param)
            expert_rank = parallel_state.get_expert_model_parallel_rank() if layout.expert else None
            mine.append((layout, tuple(param.shape), param.dtype, local_name, expert_rank))
    if parallel_state.get_expert_model_parallel_world_size() > 1:  # this stage's experts of every EP rank
        ranks: list = [None] * parallel_state.get_expert_model_parallel_world_size()
        dist.all_gather_object(ranks, [e for e in mine if e[0].expert],
                               group=parallel_state.get_expert_model_parallel_group())
        mine = [e for e in mine if not e[0].expert] + [e for entries in ranks for e in entries]
    stages: list = [mine]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, mine, group=parallel_state.get_pipeline_model_parallel_group())

    owned = {layout.name: (owner, layout, shape, dtype, local_name, expert_rank)
             for owner, entries in enumerate(stages) for layout, shape, dtype, local_name, expert_rank in entries}
    pairs = name_pairs(model)
    known = {meg for meg, _, _ in pairs}
    unmapped = sorted(f"{name} (stage {o[0]} parameter {o[4]!r})" for name, o in owned.items() if name not in known)
    missing = sorted(known - set(owned))
    if unmapped or missing:
        raise MappingError(
            f"cannot reshard to HF ({model.family}): "
            + (f"Megatron parameters without an HF mapping: {unmapped}; " if unmapped else "")
            + (f"mapped parameters the model does not have: {missing}" if missing else "")
            + " — the learner's model and the model config disagree"
        )
    hf_shapes = expected_hf_shapes(model)
    plan = []
    for meg, hf_names, kind in pairs:
        owner, layout, local_shape, dtype, local_name, expert_rank = owned[meg]
        full_shape = _canonical_shape(layout, local_shape, _tp_group(layout)[1], model.vocab_size)
        targets = tuple((name, hf_shapes[name]) for name in hf_names)
        implied = _implied_megatron_shape(kind, [s for _, s in targets])
        if full_shape != implied:
            raise MappingError(
                f"Megatron parameter {meg} (stage {owner} {local_name!r}) has canonical shape {full_shape}, "
                f"the {model.family} config implies {implied} for {', '.join(hf_names)}"
            )
        plan.append(ParamInfo(meg, owner, layout, local_shape, full_shape, dtype, kind, targets, expert_rank))
    return plan


def _tp_group(layout: ShardLayout) -> tuple:
    """(group, size) that tensor-parallel-shards `layout`'s parameter: expert-TP for experts."""
    from megatron.core import parallel_state

    if layout.expert:
        return (parallel_state.get_expert_tensor_parallel_group(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()


def _holds(info: ParamInfo) -> bool:
    """Whether this rank holds a shard of `info` (its stage, and its EP rank for an expert)."""
    from megatron.core import parallel_state

    return info.stage == parallel_state.get_pipeline_model_parallel_rank() and (
        info.expert_rank is None or info.expert_rank == parallel_state.get_expert_model_parallel_rank())


def bucket_plan(plan: list[ParamInfo], bucket_bytes: int, fp8: Fp8BlockConfig | None = None) -> list[list[TensorSlot]]:
    """`buckets.plan_buckets` over the HF tensors of `plan` as they are pushed (FP8 with `fp8`), in
    stream order."""
    specs = ((name, shape, info.dtype) for info in plan for name, shape in info.hf)
    return plan_buckets(fp8_rollout_specs(specs, fp8) if fp8 is not None else specs, bucket_bytes)


class _Scratch:
    """A growing byte buffer reused for the gathered / received shards of every other parameter
    (parameter i has been copied into its bucket before parameter i+2 arrives in its buffer)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer = torch.empty(0, dtype=torch.uint8, device=device)

    def tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.buffer[:nbytes].view(dtype).view(shape)


@dataclass
class _Arriving:
    """One parameter's shards on their way: async TP broadcasts still in flight (gloo)."""

    info: ParamInfo
    shards: list[torch.Tensor]
    works: list


def _start_shards(info: ParamInfo, local: dict, scratch: _Scratch) -> _Arriving:
    """Start moving `info`'s TP shards (one tensor when replicated) to this rank. On gloo the TP
    gather is one async broadcast per rank, so it runs while the previous parameter is copied."""
    group, tp = _tp_group(info.layout)
    partitioned = info.layout.tp_dim is not None and tp > 1
    if not _holds(info):  # arrives over EP / PP later
        return _Arriving(info, list(scratch.tensor((tp if partitioned else 1, *info.local_shape), info.dtype).unbind(0)), [])
    param = local[info.name].detach()
    if not partitioned:
        return _Arriving(info, [param], [])
    out = scratch.tensor((tp, *param.shape), param.dtype)
    if param.is_cuda:  # NCCL
        dist.all_gather_into_tensor(out, param.contiguous(), group=group)
        return _Arriving(info, list(out.unbind(0)), [])
    # gloo's all-gather is 2-4x slower than its broadcast on one host (measured): one per rank.
    me = dist.get_rank(group)
    shards = [param if r == me else out[r] for r in range(tp)]
    works = [dist.broadcast(shard, src=dist.get_global_rank(group, r), group=group, async_op=True)
             for r, shard in enumerate(shards)]
    return _Arriving(info, shards, works)


def _finish_shards(arriving: _Arriving) -> list[torch.Tensor]:
    """Wait for the TP shards, then broadcast them from the owning EP rank (an expert's, on its
    stage) and (with PP) from the owning stage."""
    from megatron.core import parallel_state

    for work in arriving.works:
        work.wait()
    info = arriving.info
    if (info.expert_rank is not None and parallel_state.get_expert_model_parallel_world_size() > 1
            and info.stage == parallel_state.get_pipeline_model_parallel_rank()):
        group = parallel_state.get_expert_model_parallel_group()
        for shard in arriving.shards:
            dist.broadcast(shard, src=dist.get_global_rank(group, info.expert_rank), group=group)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        for shard in arriving.shards:
            dist.broadcast(shard, src=dist.get_global_rank(group, arriving.info.stage), group=group)
    return arriving.shards


def _per_shard_model(model: ModelConfig, tp: int) -> ModelConfig:
    """The head counts of one TP shard, for splitting its fused QKV rows."""
    groups = model.num_query_groups or model.num_attention_heads
    return replace(model, num_attention_heads=model.num_attention_heads // tp, num_query_groups=groups // tp,
                   kv_channels=head_dim(model))


def hf_pieces(info: ParamInfo, shards: list[torch.Tensor], model: ModelConfig,
              kinds: dict) -> list[tuple[str, list[torch.Tensor], int]]:
    """(HF name, pieces, dim): each HF tensor of `info` as pieces to concatenate along dim (rows
    past the HF size along a vocabulary dim are padding)."""
    layout = info.layout
    if len(shards) == 1:
        return [(name, [t], 0) for name, t in megatron_to_hf(info.name, shards[0], model, kinds)]
    if layout.stride == (2 if info.kind == "gate_up" else 1):  # every shard is whole HF row blocks
        shard_model = _per_shard_model(model, len(shards))
        per_shard = [megatron_to_hf(info.name, shard, shard_model, kinds) for shard in shards]
        return [(name, [parts[i][1] for parts in per_shard], layout.tp_dim)
                for i, (name, _) in enumerate(per_shard[0])]
    full = unshard_tensors(shards, layout, model.vocab_size)  # the reference path
    return [(name, [t], 0) for name, t in megatron_to_hf(info.name, full, model, kinds)]


def _stream_pieces(plan: list[ParamInfo], chunks: list[torch.nn.Module], model: ModelConfig,
                   device: torch.device) -> Iterator[tuple[ParamInfo, str, list[torch.Tensor], int]]:
    """(parameter, HF name, pieces, dim) for every HF tensor, in plan order (the collective part)."""
    local = {}
    for module, local_name, param in local_parameters(chunks):
        if not is_tied_output_copy(module, local_name):
            local[shard_layout(module, local_name, param).name] = param
    kinds = {meg: (hf, kind) for meg, hf, kind in name_pairs(model)}
    scratch = (_Scratch(device), _Scratch(device))  # parameter i+1 arrives while i is copied out
    arriving = _start_shards(plan[0], local, scratch[0])
    for i, info in enumerate(plan):
        shards = _finish_shards(arriving)
        arriving = _start_shards(plan[i + 1], local, scratch[(i + 1) % 2]) if i + 1 < len(plan) else None
        for name, pieces, dim in hf_pieces(info, shards, model, kinds):
            yield info, name, pieces, dim
        shards = pieces = None  # before the scratch is reused


def _pushed_pieces(stream: Iterator[tuple[ParamInfo, str, list[torch.Tensor], int]], fp8: Fp8BlockConfig | None
                   ) -> Iterator[tuple[str, list[torch.Tensor], int, bool]]:
    """(HF name, pieces, dim, truncate) of every tensor pushed: `stream`'s, with each FP8 weight
    assembled, quantised and followed by its scale when `fp8` is set."""
    for info, name, pieces, dim in stream:
        if fp8 is not None and is_fp8_weight(name, fp8):
            whole = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
            for pushed, tensor in fp8_rollout_tensors([(name, whole)], fp8):
                yield pushed, [tensor], 0, False
        else:
            yield name, pieces, dim, info.layout.vocab


def _param_device(chunks: list[torch.nn.Module]) -> torch.device:
    return next(param.device for _, _, param in local_parameters(chunks))


def reshard_to_hf(chunks: list[torch.nn.Module], model: ModelConfig, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                  device: torch.device | str | None = None, fp8: Fp8BlockConfig | None = None) -> Iterator[FlatBucket]:
    """Stream the learner's weights as full HF tensors in buckets (see the module docstring).

    Collective: every rank of the model-parallel group must consume the whole stream (or run
    `write_hf_into` instead). `chunks` are the learner's (DDP-wrapped or bare) model chunks on this
    rank; buckets are allocated on `device` (default: the parameters'). With `fp8` the projection
    weights are pushed block-quantised to FP8 (`rollout.fp8`). The consumer should `del` each bucket
    before asking for the next one.
    """
    plan = plan_stream(chunks, model)
    buckets = bucket_plan(plan, bucket_bytes, fp8)
    device = torch.device(device) if device is not None else _param_device(chunks)
    pool = bucket_buffers(max(map(packed_bytes, buckets))) if device.type == "cpu" else None
    index, bucket = 0, None
    stream = _stream_pieces(plan, chunks, model, _param_device(chunks))
    for name, pieces, dim, truncate in _pushed_pieces(stream, fp8):
        if bucket is None:
            bucket = FlatBucket(buckets[index], device, pool)
        bucket.put(name, pieces, dim, truncate=truncate)
        if bucket.complete:
            out, bucket = bucket, None
            index += 1
            yield out
            del out  # the consumer holds the only reference now


def write_hf_into(chunks: list[torch.nn.Module], model: ModelConfig,
                  targets: dict[str, torch.Tensor] | None) -> set[str]:
    """The same stream, written straight into `targets` (HF name → tensor of an in-process engine,
    one copy, no bucket); None takes part in the collectives only. Returns the names written."""
    plan = plan_stream(chunks, model)
    written: set[str] = set()
    with torch.no_grad():
        for info, name, pieces, dim in _stream_pieces(plan, chunks, model, _param_device(chunks)):
            if targets is None:
                continue
            if name not in targets:
                raise MappingError(f"weight sync produced {name!r}, which the engine does not have "
                                   f"(it has e.g. {sorted(targets)[:3]})")
            write_pieces(targets[name], name, pieces, dim, truncate=info.layout.vocab)
            written.add(name)
    return written


def hf_tensor_bytes(model: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of all HF tensors of `model` in `dtype` (what one full sync moves)."""
    return sum(torch.Size(s).numel() for s in expected_hf_shapes(model).values()) * dtype.itemsize
