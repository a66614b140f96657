"""Forward passes of this rank's model chunks through Megatron's schedules, for any model that
scores tokens: the learner's policy, OPD's teacher model, the KL reference model.

`ModelRunner.forward(micro_batches, per_token_fn)` runs a forward-only pass through
`get_forward_backward_func` (any PP / VPP schedule) and returns what `per_token_fn(logits,
micro_batch)` computed on the last pipeline stage; `forward_sequences` does the same over whole
sequences (split into micro-batches, results per sequence on every rank; a vision-language
model's sequences come with their images, `images[i]` those of sequence i). `Learner` adds DDP,
the optimizer and `train_step` on top; `FrozenModel` adds loading a checkpoint, frozen.

Logits handed to the callbacks are vocabulary-parallel ([B, S, V/TP] on each TP rank) and
never gathered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import torch

from rlsd_megatron.config import Config
from rlsd_megatron.dtypes import torch_dtype
from rlsd_megatron.learner.batch import (
    ROUTED_EXPERTS,
    MicroBatch,
    cp_merge,
    cp_split,
    packed_micro_batch,
    padded_micro_batch,
    plan_micro_batches,
)
from rlsd_megatron.models.sharding import gather_full_state, load_full_state

PerTokenFn = Callable[[torch.Tensor, MicroBatch], dict[str, torch.Tensor]]

def place_model_chunks(chunks: list[torch.nn.Module], cfg: Config) -> list[torch.nn.Module]:
    """`chunks` on this rank's GPU (when there is one) with every parameter in the model dtype
    (`precision.params_dtype`), in place; returns them."""
    if torch.cuda.is_available():
        # megatron-core builds the model on the CPU (use_cpu_initialization) and leaves the
        # move to the caller, as Megatron-LM's get_model does before DDP: DDP's buffers live on
        # torch.cuda.current_device(), TE kernels need CUDA weights, and the mixed-precision
        # optimizer rejects parameters whose type() is not torch.cuda.*.
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    dtype = torch_dtype(cfg.precision.params_dtype)
    if dtype is not torch.float32:
        # Every parameter in the model dtype, as Megatron-LM's get_model does by wrapping
        # the chunks in Float16Module (`module.bfloat16()`). Layers that do not take
        # `params_dtype` (the local spec's torch RMSNorm) would otherwise keep fp32
        # weights, which Float16OptimizerWithFloat16Params (non-distributed optimizer)
        # puts in `fp32_from_fp32_groups`; its `sharded_state_dict` maps only the float16
        # groups to model tensors and fails on them ("Param id N does not match any model
        # sharded param"), so no checkpoint with optimizer state could be saved.
        for chunk in chunks:
            chunk.to(dtype=dtype)
    return chunks


class ModelRunner:
    """This rank's model chunks (DDP-wrapped or bare) and forward-only passes over them.

    `cfg` gives the layout and numerics (`parallel`, `precision`, `train`'s micro-batching) and
    `cfg.model` the architecture of *these* chunks (a teacher model's own, for a frozen model).
    """

    def __init__(self, cfg: Config, model: list[torch.nn.Module], *, impl: str = "local"):
        from megatron.core import parallel_state

        self.cfg = cfg
        self.impl = impl
        self.model = model
        self.config = getattr(model[0], "module", model[0]).config
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        # The last stage hands the callbacks unprojected logits (train.fused_output_layer).
        self._output_options = {"output_processor": self._unprojected} if cfg.train.fused_output_layer else {}
        # A learner's MoE load-balancing loss (`learner.moe_aux_loss`) and its weight per micro-batch.
        self.load_balancing = None
        self.load_balancing_weight = 0.0
        # A learner's routing replay (`learner.routing_replay`): micro-batches with the engine's experts.
        self.routing_replay = None

    def _unprojected(self, *, hidden_states: torch.Tensor, output_layer, output_weight, **_):
        """GPTModel's `output_processor`: the last stage's [S, B, H] hidden states and output
        weight (the embedding's when tied) instead of the output layer's logits."""
        from rlsd_megatron.ops.fused_output import output_layer_input
        from rlsd_megatron.ops.vocab_shard import UnprojectedLogits

        hidden = output_layer_input(hidden_states, sequence_parallel=output_layer.sequence_parallel)
        weight = output_weight if output_weight is not None else output_layer.weight
        return UnprojectedLogits(hidden.transpose(0, 1), weight, self.cfg.train.fused_output_chunk_tokens)

    def micro_batch(self, sequences: list[torch.Tensor], fields: dict[str, list[torch.Tensor]] | None = None,
                    images: list | None = None) -> MicroBatch:
        """A micro-batch in the layout this model's layers want: packed THD for Transformer
        Engine (no compute on padding), right-padded [B, S] for the local layers; for a
        vision-language model (`model.vision`) with M-RoPE positions and the sequences'
        `images` (`ImageInputs` or None each; None: all text). Each sequence
        is padded to a multiple of 2·CP (context-parallel chunks) and the tokens so that every
        rank's share splits evenly: over TP under sequence parallelism (megatron scatters the
        tokens), and under FP8 into a multiple of 16 rows per rank (32 for MXFP8), which TE's
        FP8 GEMMs require."""
        cp = self.cp_size
        sp = self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        chunks = 2 * cp if cp > 1 else 1
        rows = sp  # tokens of this rank's CP share must be a multiple of this
        if self.cfg.precision.fp8 != "none":
            rows *= 32 if self.cfg.precision.fp8_recipe == "mxfp8" else 16
        packed = self.impl == "transformer_engine"
        padding = ({"pad_to_multiple": chunks, "pad_total_to_multiple": math.lcm(chunks, cp * rows)} if packed
                   else {"pad_to_multiple": math.lcm(chunks, rows)})
        if self.cfg.model.vision is not None:
            from rlsd_megatron.learner.vision_batch import vision_micro_batch

            images = images if images is not None else [None] * len(sequences)
            return vision_micro_batch(sequences, images, self.cfg.model.vision, fields, packed=packed, **padding)
        if images is not None and any(x is not None for x in images):
            raise ValueError("sequences with images given to a text-only model (model.vision is unset); a "
                             "vision-language policy needs model.hf_config of a VL model or model.vision")
        return (packed_micro_batch if packed else padded_micro_batch)(sequences, fields, **padding)

    def micro_batches(self, sequences: list[torch.Tensor], fields: dict[str, list[torch.Tensor]] | None = None,
                      images: list | None = None) -> tuple[list[MicroBatch], list[list[int]]]:
        """Split sequences (with their `images`, see `micro_batch`) into micro-batches per
        `train.micro_batch_size` or, when set, `train.max_tokens_per_micro_batch` (under the
        interleaved schedule, a multiple of `parallel.pp` of them); returns them and the sequence
        indices of each."""
        train, parallel = self.cfg.train, self.cfg.parallel
        plan = plan_micro_batches(
            [len(s) for s in sequences],
            micro_batch_size=None if train.max_tokens_per_micro_batch else train.micro_batch_size,
            max_tokens=train.max_tokens_per_micro_batch,
            count_multiple=parallel.pp if parallel.vpp else 1,
        )
        fields = fields or {}
        batches = [
            self.micro_batch([sequences[i] for i in idx], {k: [v[i] for i in idx] for k, v in fields.items()},
                             [images[i] for i in idx] if images is not None else None)
            for idx in plan
        ]
        return batches, plan

    def forward_sequences(self, sequences: list[torch.Tensor], per_token_fn: PerTokenFn, images: list | None = None,
                          routed_experts: list[torch.Tensor] | None = None) -> dict[str, list[torch.Tensor]]:
        """Forward-only over whole sequences (with their `images`: `micro_batch`; with the engine's
        `routed_experts` [L_i, layers, k] of each, which a learner with routing replay routes them
        by): for each output of `per_token_fn` ([B, S, ...] per
        micro-batch), one tensor per sequence aligned with its tokens along dim 0
        (`MicroBatch.to_sequences`), in the input order, on every rank (broadcast from the last
        pipeline stage; TP ranks keep their own vocabulary shards of vocab-sized outputs)."""
        from megatron.core import parallel_state

        fields = {ROUTED_EXPERTS: routed_experts} if routed_experts is not None else None
        batches, plan = self.micro_batches(sequences, fields, images=images)
        outputs = self.forward(batches, per_token_fn)
        lengths = [len(s) for s in sequences]
        concatenated: dict[str, torch.Tensor] = {}
        if outputs is not None:
            for name in outputs[0]:
                per_sequence: list[torch.Tensor] = [None] * len(sequences)  # type: ignore[list-item]
                for out, mb, idx in zip(outputs, batches, plan):
                    for i, values in zip(idx, mb.to_sequences(out[name])):
                        per_sequence[i] = values
                concatenated[name] = torch.cat(per_sequence)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            concatenated = _broadcast_from_last_stage(concatenated, self.device)
        return {name: list(torch.split(values.cpu(), lengths)) for name, values in concatenated.items()}

    @property
    def device(self) -> torch.device:
        return next(self.model[0].parameters()).device

    @property
    def is_last_stage(self) -> bool:
        from megatron.core import parallel_state

        return parallel_state.is_pipeline_last_stage()

    # ------------------------------------------------------------------------------------------
    def _run(self, micro_batches: list[MicroBatch], fn, *, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        local = [cp_split(mb, self.cp_size, self.cp_rank) for mb in micro_batches]
        device = self.device
        # The load-balancing loss sees training forwards only (scoring passes send no routing counts).
        load_balancing = self.load_balancing if not forward_only else None

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            if load_balancing is not None:
                load_balancing.begin(mb, self.load_balancing_weight)
            if self.routing_replay is not None:
                self.routing_replay.begin(mb, model)
            images = {"images": mb.images.to(device)} if mb.images is not None else {}
            output = model(
                mb.tokens.to(device),
                mb.position_ids.to(device),
                attention_mask=None,
                packed_seq_params=_packed_params_on(mb.packed_seq_params, device),
                **self._output_options,
                **images,
            )
            if load_balancing is not None:
                load_balancing.end_forward()
            # Called on the last stage only: targets and mask next to the logits there.
            return output, lambda logits: fn(_targets_on(mb, device), logits)

        iterators = [iter(local) for _ in self.model] if len(self.model) > 1 else iter(local)
        completed = False
        try:
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators,
                model=self.model if len(self.model) > 1 else self.model[0],
                num_microbatches=len(local),
                seq_length=max(mb.tokens.shape[1] for mb in local),
                micro_batch_size=max(mb.tokens.shape[0] for mb in local),
                forward_only=forward_only,
            )
            completed = True
        finally:
            if self.routing_replay is not None:
                self.routing_replay.end()
            if load_balancing is not None:
                load_balancing.end(completed)
        return outputs

    def forward(self, micro_batches: list[MicroBatch], per_token_fn: PerTokenFn) -> list[dict] | None:
        """Forward-only pass; per micro-batch, the dict `per_token_fn(logits, mb)` returned
        (with CP shards merged back to full length), on the last PP stage; None elsewhere."""
        def collect(mb: MicroBatch, logits: torch.Tensor):
            values = per_token_fn(logits, mb)
            return torch.zeros((), device=logits.device), torch.zeros((), dtype=torch.int), {k: v.detach() for k, v in values.items()}

        for m in self.model:
            m.eval()
        with torch.no_grad():
            outputs = self._run(micro_batches, collect, forward_only=True)
        if not self.is_last_stage:
            return None
        return [self._merge_cp(out, mb) for out, mb in zip(outputs, micro_batches)]

    def _merge_cp(self, values: dict[str, torch.Tensor], mb: MicroBatch) -> dict[str, torch.Tensor]:
        if self.cp_size == 1:
            return values
        import torch.distributed as dist
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
        merged = {}
        for name, local in values.items():
            shards = [torch.empty_like(local) for _ in range(self.cp_size)]
            dist.all_gather(shards, local.contiguous(), group=group)
            indices = [cp_split(mb, self.cp_size, r).cp_index for r in range(self.cp_size)]
            merged[name] = cp_merge(shards, indices, mb.tokens.shape[1])
        return merged

    # ------------------------------------------------------------------------------------------
    def load_full_state(self, full_state: dict[str, torch.Tensor]) -> None:
        """Load canonical (TP=1, PP=1, unpadded) Megatron tensors into this rank's shards."""
        load_full_state(self.model, full_state)

    def full_state(self, *, grads: bool = False) -> dict[str, torch.Tensor]:
        """Canonical full tensors (or gradients) on every rank; for tests and small models."""
        return gather_full_state(self.model, self.cfg.model.vocab_size, grads=grads)

    def local_weights(self) -> dict[str, torch.Tensor]:
        """This rank's parameter shards by local name (live views, detached)."""
        return {name: param.detach() for name, param in self.named_parameters()}

    @contextlib.contextmanager
    def use_weights(self, weights: dict[str, torch.Tensor]):
        """Run the model with other weights of the same layout (a frozen or EMA teacher copy,
        the KL reference copy) for forward-only passes, without copying: parameters point at
        `weights` inside the block and back at their own storage after it."""
        params = dict(self.named_parameters())
        if set(weights) != set(params):
            raise ValueError(f"weights do not match the model: missing {sorted(set(params) - set(weights))[:3]}, "
                             f"unexpected {sorted(set(weights) - set(params))[:3]}")
        own = {name: param.data for name, param in params.items()}
        try:
            for name, param in params.items():
                replacement = weights[name]
                if replacement.shape != param.shape:
                    raise ValueError(f"{name}: shape {tuple(replacement.shape)} != {tuple(param.shape)}")
                param.data = replacement.to(device=param.device, dtype=param.dtype)
            yield
        finally:
            for name, param in params.items():
                param.data = own[name]

    def named_parameters(self):
        """(name, parameter) of this rank's model chunks (DDP-unwrapped); names as in GPTModel,
        prefixed with the chunk index when there are several virtual stages."""
        for index, chunk in enumerate(self.model):
            prefix = f"chunk{index}." if len(self.model) > 1 else ""
            for name, param in getattr(chunk, "module", chunk).named_parameters():
                yield prefix + name, param


def _packed_params_on(params, device: torch.device):
    """`PackedSeqParams` with its cu_seqlens on `device` (TE's attention and fused RoPE read them
    there); a tensor shared by two fields stays shared (TE tells from `cu_seqlens_q_padded is
    cu_seqlens_q` that there is no padding between sequences)."""
    if params is None:
        return None
    moved: dict[int, torch.Tensor] = {}
    changes = {}
    for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        tensor = getattr(params, name)
        if isinstance(tensor, torch.Tensor) and tensor.device != device:
            if id(tensor) not in moved:
                moved[id(tensor)] = tensor.to(device)
            changes[name] = moved[id(tensor)]
    return dataclasses.replace(params, **changes) if changes else params


def _targets_on(mb: MicroBatch, device: torch.device) -> MicroBatch:
    """`mb` with its targets and target mask on `device` (`fields` stay where the caller put
    them: they can be large, and loss functions move what they use)."""
    if mb.targets.device == device:
        return mb
    return dataclasses.replace(mb, targets=mb.targets.to(device), target_mask=mb.target_mask.to(device))


def _broadcast_from_last_stage(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The last pipeline stage's named tensors on every stage of its pipeline group (shapes and
    dtypes first, then the data; NCCL needs device tensors)."""
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    meta = [{name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}]
    torch.distributed.broadcast_object_list(meta, src=src, group=group)
    out = {}
    for name, (shape, dtype) in sorted(meta[0].items()):
        buffer = tensors[name].to(device) if name in tensors else torch.empty(shape, dtype=dtype, device=device)
        torch.distributed.broadcast(buffer, src=src, group=group)
        out[name] = buffer
    return out
