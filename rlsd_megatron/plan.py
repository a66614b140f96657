"""Memory planner: per-GPU bytes of a configuration, checked before anything is launched.

    python -m rlsd_megatron.plan --config examples/configs/rlsd_70b.yaml --world-size 64

Counts, for the most loaded pipeline stage (the first: embedding + in-flight activations; or the
last: output layer + logits):
- weights (bf16/fp32 `params_dtype`), fp32 gradient buffers (Megatron DDP reduces in fp32), and
  the optimizer (fp32 main weights + Adam moments = 12 bytes per parameter, sharded over DP×CP by
  the distributed optimizer). These reproduce Megatron's published per-parameter figures:
  18 bytes without the distributed optimizer, 6 + 12/d with it (bf16 weights, fp32 grads).
- activations per micro-batch token and layer for a SwiGLU/GQA decoder with fused (flash)
  attention, divided by TP where the tensor is split (all of it with sequence parallelism);
  ×PP micro-batches in flight on the first stage under 1F1B (×(1 + (PP−1)/(PP·VPP)) interleaved);
  full recomputation keeps only each layer's input. Tokens per micro-batch are divided by CP.
- the last stage's logits in fp32 for one micro-batch ([tokens, V/TP]) plus one chunk of the
  vocabulary-parallel ops' workspace; with `train.fused_output_layer` one chunk's logits and
  their gradient ([fused_output_chunk_tokens, V/TP] each) instead of the micro-batch's.
- a frozen / EMA teacher copy (weights, fp32 for EMA), when the teacher policy holds one (frozen,
  frozen_sync, ema).
- distillation (opsd, sdpo, grpo_opsd), training phase only: the teacher's logits of one chunk of
  `train.distill_chunk_micro_batches` micro-batches (params dtype, laid out as the student's
  micro-batches; trainer/distillation.py), the divergence's gradient for the student's logits and
  its five fp32 chunk buffers, and for a live teacher with several optimizer steps per batch the
  snapshot of the weights it scores with. Nothing on the host: the logits stay on the GPU.
- OPD's teacher model and the KL reference: frozen models held in the policy's dtype under the
  policy's TP/PP layout, their architecture read from their checkpoints' rlsd_checkpoint.json;
  the default KL reference (the initial policy) is a copy of the policy's weights. Resident in
  both phases.
- MoE (`model.num_experts`): each GPU holds its `1/(tp·ep)` of every layer's experts; their
  optimizer state is sharded over the expert-data-parallel ranks (dp·cp/ep: Megatron's expert
  layout tp x ep x expert-dp x pp) instead of dp·cp. A routed MLP keeps, per token and layer, its
  top-k copies of the token (the experts' input after the dispatch, all-gathered over TP, and
  their output for the weighted combine) and the experts' SwiGLU activations (split by TP), plus
  fp32 router logits; the alltoall dispatcher's send and receive buffers of one layer are
  transient. Tokens are assumed spread evenly over the experts (Megatron drops none without a
  capacity factor, so a skewed router needs the headroom the reserve leaves).
- a vision-language policy (`model.vision`): the vision tower's parameters (counted from
  transformers' own tower built on the meta device) on the first stage, replicated over TP,
  with no gradients or optimizer state when `model.freeze_vision_tower`; and per micro-batch
  the ViT's activations for its images: per image token merge² patches, each keeping per ViT
  block its norm inputs/outputs, QKV, attention output and MLP activations (SwiGLU for
  Qwen2.5-VL's silu, two for Qwen3-VL's GELU MLP), unsplit (the tower is not tensor-parallel),
  for `images_per_sequence` images of `data.max_pixels` per sequence (a frozen tower keeps none).
- the colocated rollout engine while it is awake: `mem_fraction_static` of the GPU (SGLang's
  weights + KV-cache pool). The engine sleeps (memory released) while the learner trains, so the
  two phases peak separately: rollout = learner state + teacher copy + engine; training = learner
  state + activations + logits + teacher copy + distillation. With `train.offload` the learner's
  weights, gradients and optimizer state are off the GPU while the engine is awake
  (learner/offload.py): the rollout phase counts only what stays (teacher copy, frozen models).
  With `rollout.placement=separate` the engines have GPUs of their own (one each, nothing else
  on it): the plan is the learner ranks' (the world less `rollout.engine_ranks`), with no engine.
Each phase must fit in `gpu_memory_gb` minus a reserve for the CUDA context, NCCL buffers and
fragmentation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from dataclasses import dataclass

from rlsd_megatron.config import Config, ConfigError, ModelConfig, load_config
from rlsd_megatron.dtypes import bytes_per_element
from rlsd_megatron.model_params import gpu_expert_params, gpu_params, total_params, vision_params
from rlsd_megatron.models.hf_config import head_dim
from rlsd_megatron.models.provider import padded_vocab_size
from rlsd_megatron.ops.vocab_shard import GPU_CHUNK_BYTES
from rlsd_megatron.trainer.distillation import chunk_micro_batches
from rlsd_megatron.trainer.objectives import uses_distillation

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    gpu_memory_gb: float = 80.0  # H100 SXM
    reserve_gb: float = 6.0  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass
class MemoryPlan:
    """Bytes per GPU of the most loaded pipeline stage, by component."""

    params: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    dispatcher: int  # MoE: one layer's alltoall send + receive buffers (0 for dense models)
    teacher_copy: int
    distillation: int
    teacher_model: int  # OPD's separate teacher
    kl_reference: int
    engine: int
    layout: str
    learner_offloaded: bool  # train.offload: the learner state is off the GPU in the rollout phase
    hardware: Hardware
    engine_ranks: int = 0  # rollout.placement=separate: the engines' own GPUs (not planned here)

    @property
    def learner_state(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def frozen_models(self) -> int:
        """OPD's teacher model and the KL reference: resident in both phases."""
        return self.teacher_model + self.kl_reference

    @property
    def training_peak(self) -> int:
        return (self.learner_state + self.activations + self.logits + self.dispatcher + self.teacher_copy
                + self.distillation + self.frozen_models)

    @property
    def rollout_peak(self) -> int:
        resident = 0 if self.learner_offloaded else self.learner_state
        return resident + self.teacher_copy + self.frozen_models + self.engine

    @property
    def budget(self) -> int:
        return int((self.hardware.gpu_memory_gb - self.hardware.reserve_gb) * GiB)

    @property
    def fits(self) -> bool:
        return max(self.training_peak, self.rollout_peak) <= self.budget

    def table(self) -> str:
        rows = [
            ("weights", self.params), ("gradients (fp32)", self.grads), ("optimizer (fp32 main + Adam)", self.optimizer),
            ("activations (in flight)", self.activations), ("logits + ops workspace", self.logits),
            *([("MoE dispatcher (one layer)", self.dispatcher)] if self.dispatcher else []),
            ("teacher copy", self.teacher_copy), ("distillation (one chunk)", self.distillation),
            ("teacher model (OPD)", self.teacher_model), ("KL reference", self.kl_reference),
            ("rollout engine (awake)", self.engine),
            ("training phase peak", self.training_peak), ("rollout phase peak", self.rollout_peak),
            ("budget", self.budget),
        ]
        lines = [f"layout: {self.layout}", f"{'component':32s} {'GiB/GPU':>10s}"]
        lines += [f"{name:32s} {value / GiB:10.2f}" for name, value in rows]
        if self.engine_ranks:
            lines.append(f"rollout engines: on {self.engine_ranks} GPU(s) of their own (rollout.placement=separate)")
        if self.learner_offloaded:
            lines.append("rollout phase: the learner's weights, gradients and optimizer state off the GPU (train.offload)")
        if self.distillation:
            lines.append("distillation on the host: none (the teacher's logits stay on the GPU, one chunk at a time)")
        lines.append("fits" if self.fits else "DOES NOT FIT")
        return "\n".join(lines)


def image_tokens_per_image(cfg: Config) -> int:
    """Image tokens of one image of `data.max_pixels` pixels: one per merge² patches of patch² pixels."""
    v = cfg.model.vision
    return cfg.data.max_pixels // (v.patch_size * v.spatial_merge_size) ** 2


def vision_activation_bytes_per_image_token(cfg: Config) -> float:
    """Bytes the ViT keeps for backward per image token: merge² patches x blocks x (norm
    inputs/outputs 4h, QKV 3h, attention output + projection input 2h, MLP 4i for SwiGLU else 2i)."""
    v = cfg.model.vision
    mlp = (4 if v.hidden_act == "silu" else 2) * v.intermediate_size
    per_patch_block = 4 * v.hidden_size + 3 * v.hidden_size + 2 * v.hidden_size + mlp
    return bytes_per_element(cfg.precision.params_dtype) * v.spatial_merge_size ** 2 * v.depth * per_patch_block


def frozen_model_bytes(cfg: Config) -> dict[str, int]:
    """Bytes per GPU of each frozen model the run loads from a checkpoint (`algorithm.teacher_model`,
    `algorithm.kl_reference`), by setting: its own architecture (from the checkpoint's metadata)
    under the policy's layout, in the policy's dtype. Its most loaded stage may not be the
    policy's: adding the two maxima is an upper bound. Raises ConfigError when a checkpoint's
    metadata cannot be read."""
    from rlsd_megatron.checkpoint.directory import CheckpointError
    from rlsd_megatron.learner.frozen_model import frozen_model_config, frozen_model_inputs

    sizes = {}
    for setting, path in frozen_model_inputs(cfg):
        try:
            model = frozen_model_config(path, cfg.model, setting)
        except CheckpointError as exc:
            raise ConfigError(f"the memory plan needs the architecture of {setting}: {exc}") from None
        sizes[setting] = gpu_params(dataclasses.replace(cfg, model=model)) * bytes_per_element(cfg.precision.params_dtype)
    return sizes


def activation_bytes_per_token_layer(cfg: Config) -> float:
    """bf16 activations one decoder layer keeps for backward, per token, on one GPU."""
    m, p = cfg.model, cfg.parallel
    h, f, t = m.hidden_size, m.ffn_hidden_size, p.tp
    dim = head_dim(m)
    q, kv = m.num_attention_heads * dim, (m.num_query_groups or m.num_attention_heads) * dim
    replicated = 4 * h  # norm inputs/outputs on the residual stream (split by TP only with SP)
    split = (q + 2 * kv) + 2 * q  # QKV, attention out + proj input
    copies, router_logits = 0, 0
    if m.num_experts:
        # The token's top-k copies (the experts' input, all-gathered over TP, and their output),
        # the experts' fc1 outputs and SwiGLU parts (and the shared expert's), fp32 router logits.
        copies, router_logits = 2 * m.moe_router_topk * h, 4 * m.num_experts
        split += 4 * m.moe_router_topk * (m.moe_ffn_hidden_size or f) + 4 * (m.moe_shared_expert_intermediate_size or 0)
    else:
        split += 2 * f + 2 * f  # fc1 out, SwiGLU parts
    dtype_bytes = bytes_per_element(cfg.precision.params_dtype)
    return dtype_bytes * (replicated / (t if p.sequence_parallel else 1) + split / t + copies) + router_logits


def micro_batch_tokens(cfg: Config) -> int:
    t = cfg.train
    if t.max_tokens_per_micro_batch:
        return t.max_tokens_per_micro_batch
    return t.micro_batch_size * t.max_seq_length


def plan_memory(cfg: Config, hardware: Hardware = Hardware(), *, images_per_sequence: int = 1) -> MemoryPlan:
    """Per-GPU memory of `cfg` on `hardware` (see the module docstring for what is counted);
    `images_per_sequence`: a vision-language policy's images of `data.max_pixels` per sequence."""
    p, prec = cfg.parallel, cfg.precision
    dtype_bytes = bytes_per_element(prec.params_dtype)
    params, experts = gpu_params(cfg), gpu_expert_params(cfg)
    # A frozen tower has no gradients or optimizer state (its parameters do not require grad).
    trainable = params - (vision_params(cfg) if cfg.model.freeze_vision_tower else 0)
    dp_cp = (p.dp or 1) * p.cp
    optimizer_shards = dp_cp if p.use_distributed_optimizer else 1
    expert_optimizer_shards = max(dp_cp // p.ep, 1) if p.use_distributed_optimizer else 1
    tokens = math.ceil(micro_batch_tokens(cfg) / p.cp)
    layers = cfg.model.num_layers // p.pp
    full_layer = activation_bytes_per_token_layer(cfg)
    in_flight = p.pp * (1 + (p.pp - 1) / (p.pp * p.vpp)) if p.vpp else p.pp
    if prec.recompute_granularity == "full":
        # Each layer keeps its input; one layer's activations are rebuilt at a time in backward.
        layer_input = cfg.model.hidden_size * dtype_bytes / (p.tp if p.sequence_parallel else 1)
        activations = tokens * (layers * layer_input * in_flight + full_layer)
    else:
        # Selective recompute reruns core attention in backward instead of keeping its scores, which
        # flash attention (TE on GPUs) never stores: the same count as no recompute.
        activations = tokens * layers * full_layer * in_flight
    if cfg.model.vision is not None and not cfg.model.freeze_vision_tower:
        sequences = max(micro_batch_tokens(cfg) // cfg.train.max_seq_length, 1)
        image_tokens = sequences * images_per_sequence * image_tokens_per_image(cfg)
        activations += image_tokens * vision_activation_bytes_per_image_token(cfg) * in_flight
    vocab_local = padded_vocab_size(cfg.model, p.tp) // p.tp
    if cfg.train.fused_output_layer:  # one chunk's logits and their gradient at a time (ops/fused_output.py)
        chunk = min(tokens, cfg.train.fused_output_chunk_tokens)
        logits = 2 * chunk * vocab_local * 4 + min(chunk, 4096) * vocab_local * 4
    else:
        logits = tokens * vocab_local * 4 + min(tokens, 4096) * vocab_local * 4
    holds_copy = cfg.algorithm.teacher_weights in ("frozen", "frozen_sync", "ema")
    frozen = frozen_model_bytes(cfg)
    # Without a kl_reference checkpoint the reference is a copy of the initial policy's weights.
    reference_copy = params * dtype_bytes if cfg.algorithm.kl_coef and not cfg.algorithm.kl_reference else 0
    teacher_bytes = 4 if cfg.algorithm.teacher_weights == "ema" else dtype_bytes
    # An upper bound: sglang 0.5.23 sizes the engine (weights + KV) as mem_fraction_static x the memory free
    # when it starts, after the learner's weights (`pre_model_load_memory`; with train.offload the learner is
    # off the GPU then), not x the whole GPU.
    colocated_sglang = cfg.rollout.backend != "embedded" and cfg.rollout.placement == "colocated"
    engine = int(cfg.rollout.mem_fraction_static * hardware.gpu_memory_gb * GiB) if colocated_sglang else 0
    return MemoryPlan(
        params=params * dtype_bytes,
        grads=trainable * 4,
        optimizer=(trainable - experts) * 12 // optimizer_shards + experts * 12 // expert_optimizer_shards,
        activations=int(activations),
        logits=int(logits),
        dispatcher=dispatcher_bytes(cfg, tokens),
        teacher_copy=params * teacher_bytes if holds_copy else 0,
        distillation=distillation_bytes(cfg, vocab_local, weights=params * dtype_bytes),
        teacher_model=frozen.get("algorithm.teacher_model", 0),
        kl_reference=frozen.get("algorithm.kl_reference", reference_copy),
        engine=engine,
        layout=f"tp={p.tp} pp={p.pp}{f' vpp={p.vpp}' if p.vpp else ''} cp={p.cp}{f' ep={p.ep}' if p.ep > 1 else ''}"
               f" dp={p.dp or 1}"
               f"{' sp' if p.sequence_parallel else ''}{' distopt' if p.use_distributed_optimizer else ''}"
               f" recompute={prec.recompute_granularity}",
        hardware=hardware,
        learner_offloaded=cfg.train.offload != "none",
        engine_ranks=cfg.rollout.engine_ranks if cfg.rollout.placement == "separate" else 0,
    )


def dispatcher_bytes(cfg: Config, tokens: int) -> int:
    """MoE: the alltoall dispatcher's send and receive buffers for one layer's top-k token copies
    ([tokens x top-k, hidden] each, tokens all-gathered over TP; 0 for a dense model)."""
    m = cfg.model
    if not m.num_experts:
        return 0
    return 2 * tokens * m.moe_router_topk * m.hidden_size * bytes_per_element(cfg.precision.params_dtype)


def distillation_bytes(cfg: Config, vocab_local: int, *, weights: int) -> int:
    """Training-phase bytes per GPU that distillation adds (0 for other methods): the teacher's
    logits for one chunk of micro-batches ([chunk x micro-batch tokens, V/TP] in the params dtype,
    plus the context-parallel share `cp_split` copies), the divergence's gradient for the student's
    logits ([tokens/CP, V/TP]) and its five fp32 chunk buffers (ops/divergences.py), and for a live
    teacher with several optimizer steps per batch a snapshot of the `weights` bytes it scores with."""
    if not uses_distillation(cfg.algorithm):
        return 0
    p, t = cfg.parallel, cfg.train
    dtype_bytes = bytes_per_element(cfg.precision.params_dtype)
    chunk_tokens = chunk_micro_batches(cfg) * micro_batch_tokens(cfg)
    teacher_logits = chunk_tokens * vocab_local * dtype_bytes
    if p.cp > 1:
        teacher_logits += teacher_logits // p.cp
    tokens = math.ceil(micro_batch_tokens(cfg) / p.cp)
    workspace_rows = min(tokens, max(1, GPU_CHUNK_BYTES // (4 * vocab_local)))
    divergence = tokens * vocab_local * dtype_bytes + 5 * workspace_rows * vocab_local * 4
    live_snapshot = cfg.algorithm.teacher_weights == "live" and t.ppo_epochs * t.optimizer_steps_per_batch > 1
    snapshot = weights if live_snapshot else 0
    return teacher_logits + divergence + snapshot


def check_fits(cfg: Config, world_size: int, hardware: Hardware = Hardware(), *,
               images_per_sequence: int = 1) -> MemoryPlan:
    """Plan for `world_size` GPUs; raise ConfigError with the table when it does not fit."""
    model_parallel = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    cfg = copy.deepcopy(cfg)
    cfg.parallel.dp = cfg.parallel.dp or max(world_size // model_parallel, 1)
    plan = plan_memory(cfg, hardware, images_per_sequence=images_per_sequence)
    if not plan.fits:
        raise ConfigError(
            "the layout does not fit in GPU memory:\n" + plan.table()
            + "\nraise parallel.pp/tp, enable parallel.use_distributed_optimizer with more data parallelism, "
              "set precision.recompute_granularity=full (with recompute_method=uniform, recompute_num_layers=1), "
              "lower train.max_tokens_per_micro_batch or "
              "rollout.mem_fraction_static, or set train.offload=copy (the learner off the GPU while the engine generates)"
        )
    return plan


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "kv_channels")


def names_no_model(cfg: Config) -> bool:
    """No `model.hf_config` and every shape field at its default: the built-in placeholder model."""
    default = ModelConfig()
    return cfg.model.hf_config is None and all(getattr(cfg.model, f) == getattr(default, f) for f in _SHAPE_FIELDS)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def describe_model(cfg: Config, config_path: str) -> str:
    """One line: which model is planned, its parameter count and shape, and where it came from."""
    m = cfg.model
    source = (f"model.hf_config={m.hf_config}" if m.hf_config else
              "the built-in default (no model in the config)" if names_no_model(cfg) else
              f"the model.* fields of {config_path}")
    tower = (f", a {_count(vision_params(cfg))} {m.vision.model_type} vision tower"
             f"{' (frozen)' if m.freeze_vision_tower else ''}" if m.vision is not None else "")
    mlp = (f"{m.num_experts} experts (top-{m.moe_router_topk}) of width {m.moe_ffn_hidden_size or m.ffn_hidden_size}"
           if m.num_experts else f"ffn {m.ffn_hidden_size}")
    return (f"model: {_count(total_params(cfg))} parameters ({m.family}, {m.num_layers} layers, hidden {m.hidden_size}, "
            f"{m.num_attention_heads} heads / {m.num_query_groups or m.num_attention_heads} KV groups, {mlp}, "
            f"vocab {m.vocab_size}{tower}) from {source}")


PROG = "rlsd-plan"


def main(argv: list[str] | None = None) -> int:
    """Exit status 0: the layout fits; 1: it does not fit (the table says where); 2: the config,
    its overrides or the layout for this world size are invalid (what rlsd-train would refuse)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Per-GPU memory plan of a configuration on a GPU cluster, with the layout checks "
                               "rlsd-train runs at start-up (exit 0: fits, 1: does not fit, 2: invalid config)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, required=True, help="number of GPUs")
    parser.add_argument("--gpu-memory-gb", type=float, default=Hardware.gpu_memory_gb)
    parser.add_argument("--images-per-sequence", type=int, default=1,
                        help="a vision-language policy's images (of data.max_pixels) per sequence, for the vision "
                             "tower's activations (default 1)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.world_size < 1:
        parser.error(f"--world-size={args.world_size}: give the number of GPUs of the run (1 or more)")
    if args.images_per_sequence < 0:
        parser.error(f"--images-per-sequence={args.images_per_sequence}: give how many images a sequence holds (0 or more)")
    if args.gpu_memory_gb <= Hardware.reserve_gb:
        parser.error(f"--gpu-memory-gb={args.gpu_memory_gb:g} leaves nothing after the {Hardware.reserve_gb:g} GB reserve "
                     "for the CUDA context and NCCL; give the GPU's memory, e.g. 80 for an H100")
    from rlsd_megatron.config_checks import engine_ranks, validate_config
    from rlsd_megatron.learner.frozen_model import frozen_model_inputs, frozen_model_problems

    try:
        cfg = load_config(args.config, args.overrides)
        # rlsd-train's own checks for this world size, on the GPU cluster the plan is for (CUDA and
        # Transformer Engine present), not on the machine that runs the planner.
        validate_config(cfg, args.world_size, cuda_available=True, te_available=True)
        frozen_problems = [problem for setting, path in frozen_model_inputs(cfg)
                           for problem in frozen_model_problems(cfg, path, setting)]
        if frozen_problems:
            raise ConfigError("; ".join(frozen_problems))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if names_no_model(cfg):
        print(f"{PROG}: warning: {args.config} names no model (no model.hf_config and no model.* shape fields): this "
              f"plans the built-in {_count(total_params(cfg))}-parameter placeholder, not your model; add "
              "model.hf_config=/path/to/hf_model_dir", file=sys.stderr)
    print(describe_model(cfg, args.config))
    try:
        plan = check_fits(cfg, args.world_size - engine_ranks(cfg), Hardware(gpu_memory_gb=args.gpu_memory_gb),
                          images_per_sequence=args.images_per_sequence)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(plan.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
