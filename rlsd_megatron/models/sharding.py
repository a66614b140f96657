"""How a full (TP=1, PP=1) Megatron GPT state maps onto this rank's TP/PP shards, and back.

The single Megatron-side layout description used by weight loading, the parity tests, weight
resharding to rollout engines and the checkpoint converters (the HF ⇄ Megatron name mapping
builds on top of it). Canonical names are those of a TP=1, PP=1 `GPTModel` with the local
layer spec: global layer numbers, `input_layernorm` / `pre_mlp_layernorm` as their own
parameters, and the vocabulary *unpadded* (padding depends on TP).

Tensor-parallel partitioning is read from the attributes megatron-core puts on every
parameter (`tensor_model_parallel`, `partition_dim`, `partition_stride`), so it follows the
layers rather than a name table. Stride s means the full tensor is cut into tp·s pieces along
the partition dim and rank r holds pieces r, r+tp, … (SwiGLU's fused gate/up fc1 has s=2, so
every rank holds matching gate and up rows).

MoE experts (`mlp.experts.…`) are canonically numbered globally as megatron-core's
`SequentialMLP` at EP=1 names them (`mlp.experts.local_experts.{j}.linear_fc1.weight`): expert
parallel rank r holds experts r·n … r·n+n-1 of n = experts / EP as its local 0 … n-1, and
Transformer Engine's `TEGroupedMLP` keeps local expert k as `mlp.experts.linear_fc1.weight{k}`.
Experts are tensor-parallel over megatron's expert-TP group (tp ranks unless set otherwise) and
gathered over the expert-parallel group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

# Transformer Engine fuses the pre-norms into the following linear layer.
_TE_TO_CANONICAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")  # SequentialMLP
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")  # TEGroupedMLP


@dataclass(frozen=True)
class ShardLayout:
    """Where one local parameter sits in the canonical full state."""

    name: str  # canonical name
    tp_dim: int | None  # partition dim, None when replicated across TP
    stride: int
    vocab: bool  # rows are vocabulary entries (padded locally)
    expert: bool = False  # an MoE expert's: sharded over the expert-TP group, one EP rank holds it


def canonical_name(chunk: torch.nn.Module, local_name: str) -> str:
    """Canonical name of a parameter of a (DDP-unwrapped) GPTModel chunk."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    index, rest = int(match.group(1)), match.group(2)
    rest = _TE_TO_CANONICAL.get(rest, rest)
    layer = chunk.decoder.layers[index]
    expert = _LOCAL_EXPERT.match(rest) or _GROUPED_EXPERT.match(rest)
    if expert:
        local, tensor = (int(expert.group(1)), expert.group(2)) if expert.re is _LOCAL_EXPERT else (
            int(expert.group(3)), f"{expert.group(1)}.{expert.group(2)}")
        rest = f"mlp.experts.local_experts.{_first_local_expert(layer) + local}.{tensor}"
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def _first_local_expert(layer: torch.nn.Module) -> int:
    """Global number of this rank's first expert in an MoE `layer`."""
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_rank() * layer.mlp.experts.num_local_experts


def _tp_rank_and_size(layout: ShardLayout) -> tuple[int, int]:
    """This rank's (rank, size) in the tensor-parallel group that shards `layout`'s tensor."""
    from megatron.core import parallel_state

    if layout.expert:
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def is_tied_output_copy(chunk: torch.nn.Module, local_name: str) -> bool:
    """The last stage's copy of tied embeddings under PP: mirrors the first stage's embedding."""
    return local_name == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False)


def shard_layout(chunk: torch.nn.Module, local_name: str, param: torch.Tensor) -> ShardLayout:
    partitioned = bool(getattr(param, "tensor_model_parallel", False))
    name = canonical_name(chunk, local_name)
    return ShardLayout(
        name=name,
        tp_dim=param.partition_dim if partitioned else None,
        stride=getattr(param, "partition_stride", 1) if partitioned else 1,
        vocab=local_name in _VOCAB_PARAMS,
        expert=".mlp.experts." in name,
    )


def shard_tensor(full: torch.Tensor, layout: ShardLayout, tp_rank: int, tp_size: int, local_shape) -> torch.Tensor:
    """This TP rank's piece of a canonical tensor, vocabulary padded with zero rows."""
    if layout.vocab:
        padded_rows = local_shape[0] * tp_size
        full = torch.cat([full, full.new_zeros(padded_rows - full.shape[0], *full.shape[1:])])
    if layout.tp_dim is None:
        return full
    pieces = torch.chunk(full, tp_size * layout.stride, dim=layout.tp_dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=layout.tp_dim)


def unshard_tensors(shards: list[torch.Tensor], layout: ShardLayout, vocab_size: int) -> torch.Tensor:
    """Inverse of `shard_tensor`: TP shards (in rank order) → canonical tensor."""
    if layout.tp_dim is None:
        full = shards[0]
    else:
        tp_size = len(shards)
        split = [torch.chunk(s, layout.stride, dim=layout.tp_dim) for s in shards]
        full = torch.cat([split[r][k] for k in range(layout.stride) for r in range(tp_size)], dim=layout.tp_dim)
    return full[:vocab_size] if layout.vocab else full


def local_parameters(chunks: list[torch.nn.Module]) -> Iterator[tuple[torch.nn.Module, str, torch.Tensor]]:
    """(chunk, local name, parameter) of DDP-unwrapped chunks (tied output copies included)."""
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        for name, param in module.named_parameters():
            yield module, name, param


def load_full_state(chunks: list[torch.nn.Module], full_state: dict[str, torch.Tensor]) -> None:
    """Copy canonical full tensors into this rank's shards (every rank holds `full_state`)."""
    with torch.no_grad():
        for module, name, param in local_parameters(chunks):
            layout = shard_layout(module, name, param)
            tp_rank, tp_size = _tp_rank_and_size(layout)
            source = "embedding.word_embeddings.weight" if is_tied_output_copy(module, name) else layout.name
            if source not in full_state:
                raise KeyError(f"full state has no tensor {source!r} for parameter {name!r}")
            piece = shard_tensor(full_state[source], layout, tp_rank, tp_size, param.shape)
            if piece.shape != param.shape:
                raise ValueError(f"{source}: shard shape {tuple(piece.shape)} != parameter shape {tuple(param.shape)}")
            param.copy_(piece)


def gather_full_state(chunks: list[torch.nn.Module], vocab_size: int, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Canonical full tensors (or their gradients, `grads=True`) assembled on every rank.

    All-gathers over the (expert-)TP group, exchanges experts over the expert-parallel group and
    stages over the PP group with pickled CPU tensors: meant for tests and small models. The
    rollout path streams instead.
    """
    from megatron.core import parallel_state

    stage_state: dict[str, torch.Tensor] = {}
    for module, name, param in local_parameters(chunks):
        if is_tied_output_copy(module, name):
            continue
        layout = shard_layout(module, name, param)
        group = (parallel_state.get_expert_tensor_parallel_group() if layout.expert
                 else parallel_state.get_tensor_model_parallel_group())
        tensor = _grad_of(param) if grads else param.detach()
        shards = [torch.empty_like(tensor) for _ in range(_tp_rank_and_size(layout)[1])]
        dist.all_gather(shards, tensor.contiguous(), group=group)
        stage_state[layout.name] = unshard_tensors(shards, layout, vocab_size).cpu()
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        expert_ranks: list = [None] * parallel_state.get_expert_model_parallel_world_size()
        dist.all_gather_object(expert_ranks, stage_state, group=parallel_state.get_expert_model_parallel_group())
        stage_state = {name: tensor for state in expert_ranks for name, tensor in state.items()}
    stages: list = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, stage_state, group=parallel_state.get_pipeline_model_parallel_group())
    full: dict[str, torch.Tensor] = {}
    for state in stages:
        full.update(state)
    return full


def _grad_of(param: torch.Tensor) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    if grad is None:
        grad = param.grad
    if grad is None:
        return torch.zeros_like(param)
    return grad.detach().to(param.dtype)
