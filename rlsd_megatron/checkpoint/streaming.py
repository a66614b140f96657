"""Canonical tensors streamed into and out of a torch_dist checkpoint by one process.

The converters never hold the model: the checkpoint's layout (keys, global shapes, the
layer axis Megatron prepends, SwiGLU's split of fc1, padded-vocabulary flags) is read off the
`sharded_state_dict()` of a TP=1/PP=1 `GPTModel` built on the *meta* device (zero bytes), and
tensor data moves one canonical tensor at a time:

- writing: torch.distributed.checkpoint's `FileSystemWriter` with one thread asks the save
  planner for each chunk right before writing it; our planner produces it then from the next
  canonical tensor (items are ordered like `hf_mapping.name_pairs`, so the source can be a
  generator over HF safetensors). Peak memory: one canonical tensor and its HF parts.
- reading: `dist_checkpointing.load` of one layer's entries at a time (peak: one layer, or the
  embedding and output layer).

A checkpoint is TP/PP-independent except for vocabulary padding, which megatron-core marks
`allow_shape_mismatch` (any TP loads it, zero-filling or dropping padding rows), so what one
process writes here any layout loads, and the result is the same files a trainer would write.

Callers must be inside a TP=1/PP=1 megatron parallel state (`rlsd_megatron.parallel.state.
model_parallel()`); only the calling process does I/O.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from rlsd_megatron.checkpoint.directory import CheckpointError, describe_failure, storage_errors
from rlsd_megatron.config import Config, ModelConfig
from rlsd_megatron.models.hf_mapping import name_pairs

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.", "vision_model.")
COMMON_STATE = {"checkpoint_version": 3.0}  # Megatron-LM reads this; 3.0 = mcore layout


def _require_single_layout() -> None:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (1, 1):
        raise RuntimeError(f"streaming conversion needs a TP=1/PP=1 parallel state, got TP={tp}/PP={pp}")


def meta_layout(model: ModelConfig, *, dtype: torch.dtype, vocab_tp: int = 1) -> dict:
    """The TP=1/PP=1 sharded state dict of `model` on the meta device, by canonical name.

    `vocab_tp` pads the vocabulary as a TP=`vocab_tp` model would (what a trainer at that TP
    saves). Values are megatron `ShardedTensor`s, `ShardedTensorFactory`s (fc1) and
    `ShardedObject`s (`_extra_state`), their data meta tensors of `dtype`.
    """
    from rlsd_megatron.models.provider import build_model_chunks

    _require_single_layout()
    padded = dataclasses.replace(model, make_vocab_size_divisible_by=model.make_vocab_size_divisible_by * vocab_tp)
    with torch.device("meta"):
        (chunk,) = build_model_chunks(Config(model=padded), impl="local")
    layout = {name: _with_data(entry, entry.data.to(dtype)) if isinstance(getattr(entry, "data", None), torch.Tensor)
              else entry for name, entry in chunk.sharded_state_dict().items()}
    tensors = {name for name, entry in layout.items() if not name.endswith("_extra_state")}
    expected = {meg for meg, _, _ in name_pairs(model)}
    if tensors != expected:
        raise RuntimeError(
            f"megatron-core's GPTModel and hf_mapping disagree for {model.family}: model-only "
            f"{sorted(tensors - expected)}, mapping-only {sorted(expected - tensors)}"
        )
    return layout


def export_order(model: ModelConfig) -> list[str]:
    """Canonical names in the order `read_canonical_tensors` yields them: everything outside
    the layers first (embedding, final norm, output layer), then layer by layer."""
    names = [meg for meg, _, _ in name_pairs(model)]
    outside = [n for n in names if not _LAYER.match(n)]
    layers = sorted((int(_LAYER.match(n).group(1)), i, n) for i, n in enumerate(names) if _LAYER.match(n))
    return outside + [n for _, _, n in layers]


# ---------------------------------------------------------------------------------------------
# Writing


class _OrderedSource:
    """Hands out canonical tensors from a generator to a consumer that asks by name, keeping a
    tensor only until its last chunk was written (`uses[name]` chunks)."""

    def __init__(self, tensors: Iterable[tuple[str, torch.Tensor]], uses: Counter,
                 on_tensor: Callable[[str], None] | None):
        self._iter = iter(tensors)
        self._held: dict[str, torch.Tensor] = {}
        self._left = Counter(uses)
        self._on_tensor = on_tensor
        self.peak_held = 0

    def take(self, name: str) -> torch.Tensor:
        while name not in self._held:
            try:
                got, tensor = next(self._iter)
            except StopIteration:
                raise CheckpointError(f"the tensor source ended before {name!r} was produced") from None
            if got not in self._left:
                raise CheckpointError(f"the tensor source produced {got!r}, which the model does not have")
            self._held[got] = tensor
            self.peak_held = max(self.peak_held, len(self._held))
            if self._on_tensor:
                self._on_tensor(got)
        tensor = self._held[name]
        self._left[name] -= 1
        if self._left[name] == 0:
            del self._held[name]
        return tensor

    def finish(self) -> None:
        leftover = [name for name, _ in self._iter]
        if leftover or self._held:
            raise CheckpointError(f"the tensor source produced tensors that were never written: {leftover or list(self._held)}")


def _chunk_of(canonical: torch.Tensor, sh_ten, name: str) -> torch.Tensor:
    """The piece of a canonical tensor a (TP=1) ShardedTensor stores, zero-padding vocab rows."""
    prepend = sh_ten.prepend_axis_num
    full_shape = tuple(sh_ten.global_shape[prepend:])
    if sh_ten.allow_shape_mismatch and canonical.shape[0] < full_shape[0]:
        pad = canonical.new_zeros(full_shape[0] - canonical.shape[0], *canonical.shape[1:])
        canonical = torch.cat([canonical, pad])
    if tuple(canonical.shape) != full_shape:
        raise CheckpointError(f"{name}: tensor of shape {tuple(canonical.shape)}, the model expects {full_shape}")
    index = tuple(slice(o, o + s) for o, s in zip(sh_ten.global_offset[prepend:], sh_ten.local_shape))
    return canonical[index]


def write_canonical_checkpoint(checkpoint_dir: str | Path, model: ModelConfig,
                               tensors: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype,
                               vocab_tp: int = 1, common: dict | None = None,
                               on_tensor: Callable[[str], None] | None = None) -> int:
    """Write canonical (TP=1, PP=1, unpadded) tensors, given in `hf_mapping.name_pairs` order,
    as a torch_dist checkpoint into the empty directory `checkpoint_dir`; return how many
    tensors were held at once at most (1 when the order is right).

    `common` holds extra non-tensor state (Megatron-LM's `iteration` etc.); `on_tensor(name)`
    is called as each tensor arrives (progress bars).
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    layout = meta_layout(model, dtype=dtype, vocab_tp=vocab_tp)
    order = {meg: i for i, (meg, _, _) in enumerate(name_pairs(model))}
    state = {"model": layout, **COMMON_STATE, **(common or {})}
    sharded, common_state = save_preprocess(state, validate_access_integrity=False)
    chunks: dict[tuple, tuple[str, ShardedTensor]] = {}  # (key, global offset) -> (canonical name, chunk)
    for name, value in sharded["model"].items():
        for sh_ten in value if isinstance(value, list) else [value]:
            if isinstance(sh_ten, ShardedTensor):
                chunks[(sh_ten.key, tuple(sh_ten.global_offset))] = (name, sh_ten)
    # What megatron's own save adds: the common state as one object inside the checkpoint.
    sharded["common_state"] = ShardedObject("common_state", common_state, (1,), (0,), replica_id=0)
    grouped, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    pyt_state = mcore_to_pyt_state_dict(grouped, is_loading=False)
    source = _OrderedSource(tensors, Counter(name for name, _ in chunks.values()), on_tensor)

    class StreamingPlanner(MCoreSavePlanner):
        def create_local_plan(self):
            plan = super().create_local_plan()
            def rank(item):  # objects first, then tensors in the source's order
                found = chunks.get((item.index.fqn, tuple(item.index.offset or ())))
                return (1, order[found[0]], tuple(item.index.offset)) if found else (0, 0, ())
            self.plan = dataclasses.replace(plan, items=sorted(plan.items, key=rank))
            return self.plan

        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            if not (isinstance(data, torch.Tensor) and data.is_meta):
                return data
            name, sh_ten = chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
            piece = _chunk_of(source.take(name), sh_ten, name)
            return piece.to(data.dtype).reshape(data.shape).contiguous()

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    planner = StreamingPlanner(dedup_replicated_tensors=False, flatten_state_dict=False, flatten_sharded_tensors=False)
    # One writer thread: DCP then resolves (i.e. produces) one item at a time, right before writing it.
    writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, single_file_per_rank=True, sync_files=True)
    dcp.save(pyt_state, storage_writer=writer, planner=planner, no_dist=True)
    source.finish()
    save_config(CheckpointingConfig("torch_dist", 1), str(checkpoint_dir))  # written last: marks it complete
    return source.peak_held


# ---------------------------------------------------------------------------------------------
# Reading


def _stored_tensors(checkpoint_dir: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
    except storage_errors() as exc:  # unreadable .metadata: a truncated or foreign file
        raise CheckpointError(f"cannot read the tensor index of {checkpoint_dir}: {describe_failure(exc)}") from None


def stored_dtype(checkpoint_dir: str | Path) -> torch.dtype:
    """The dtype the word embeddings are stored in (the checkpoint's parameter dtype)."""
    stored = _stored_tensors(Path(checkpoint_dir))
    if "embedding.word_embeddings.weight" not in stored:
        raise CheckpointError(f"{checkpoint_dir} has no embedding.word_embeddings.weight; not a GPT model checkpoint")
    return stored["embedding.word_embeddings.weight"].dtype


def check_layout(checkpoint_dir: Path, model: ModelConfig, layout: dict) -> dict:
    """Compare the checkpoint's tensors with the model's; raise listing every difference.
    Returns {sharded key: stored dtype}."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    stored = _stored_tensors(checkpoint_dir)
    built = {name: dataclasses.replace(entry) for name, entry in layout.items() if not name.endswith("_extra_state")}
    apply_factories(built)
    expected: dict[str, ShardedTensor] = {}
    for value in built.values():
        for sh_ten in value if isinstance(value, list) else [value]:
            expected.setdefault(sh_ten.key, sh_ten)
    problems = []
    for key, sh_ten in expected.items():
        if key not in stored:
            problems.append(f"missing tensor {key}")
            continue
        have, want = tuple(stored[key].global_shape), tuple(sh_ten.global_shape)
        axis = sh_ten.prepend_axis_num
        vocab_ok = sh_ten.allow_shape_mismatch and have[axis] >= model.vocab_size and have[axis + 1:] == want[axis + 1:]
        if have != want and not vocab_ok:
            problems.append(f"{key} has shape {have}, the model expects {want}")
    unexpected = sorted(k for k in stored if k.startswith(_MODEL_KEY_PREFIXES) and k not in expected)
    if unexpected:
        problems.append(f"tensors the model does not have: {unexpected[:6]}{'…' if len(unexpected) > 6 else ''}")
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} does not match the {model.family} model config "
            f"({model.num_layers} layers, hidden {model.hidden_size}): " + "; ".join(problems)
        )
    return {key: stored[key].dtype for key in expected}


def read_canonical_tensors(checkpoint_dir: str | Path, model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical tensors of a torch_dist checkpoint in `export_order(model)`, in their stored
    dtype, loading one layer (or the embedding, or the output layer) at a time, whatever TP/PP
    layout it was saved at."""
    from megatron.core import dist_checkpointing

    checkpoint_dir = Path(checkpoint_dir)
    layout = meta_layout(model, dtype=torch.float32)
    dtypes = check_layout(checkpoint_dir, model, layout)
    groups: dict[object, list[str]] = {}  # one load per layer; embedding / output layer alone
    for name in export_order(model):
        match = _LAYER.match(name)
        groups.setdefault(int(match.group(1)) if match else name, []).append(name)
    for names in groups.values():
        buffers, request = {}, {}
        for name in names:
            entry = layout[name]
            buffers[name] = torch.empty(entry.data.shape, dtype=dtypes[entry.key])
            for j, sh_ten in enumerate(_read_requests(_with_data(entry, buffers[name]))):
                request[f"{name}#{j}"] = sh_ten
        try:
            dist_checkpointing.load(request, str(checkpoint_dir), validate_access_integrity=False)
        except storage_errors() as exc:
            raise CheckpointError(
                f"reading {names[0]}… from {checkpoint_dir} failed ({describe_failure(exc)}); "
                f"a file of the checkpoint is truncated or corrupt — re-save or re-convert it"
            ) from None
        for name in names:
            tensor = buffers.pop(name)
            if getattr(layout[name], "allow_shape_mismatch", False):
                tensor = tensor[: model.vocab_size]
            yield name, tensor


def _with_data(entry, data: torch.Tensor):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(entry, ShardedTensor):
        return dataclasses.replace(entry, data=data, dtype=data.dtype)
    return dataclasses.replace(entry, data=data)


def _read_requests(entry) -> list:
    """ShardedTensors that load straight into views of `entry.data` (factories applied, so
    fc1's two halves land in place), with the layer axis made an ordinary axis of size 1.

    Why: megatron converts a layer-stacked request into a torch ShardedTensor that assumes the
    other layers live on another rank, which fails in a world of one; without prepended axes
    it uses its irregular-shard path, which reads any sub-block.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    built = entry.build() if isinstance(entry, ShardedTensorFactory) else entry
    requests = []
    for sh_ten in built if isinstance(built, list) else [built]:
        prepend = sh_ten.prepend_axis_num
        if prepend:
            local = (1,) * prepend + tuple(sh_ten.local_shape)
            sh_ten = dataclasses.replace(sh_ten, data=sh_ten.data.view(local), local_shape=local, prepend_axis_num=0)
        requests.append(sh_ten)
    assert all(isinstance(r, ShardedTensor) for r in requests)
    return requests
