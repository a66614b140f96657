"""Builds megatron-core `GPTModel` chunks for the registered model families (`models.families`),
and for vision-language ones (`model.vision`: `models.vision_language.VisionLanguageModel`, a GPTModel).

Why `GPTModel` and not its successor `HybridModel` (tried on megatron-core 0.19.2): a dense
Llama layer is the pattern `*-` (an attention sublayer, then an MLP sublayer), and `HybridModel`
built from the GPT local submodules gives bit-identical logits on CPU, but only after working
around three things, the last of which is a format change: (1) `HybridStack` always makes its
final norm a `TENorm` (hybrid_block.py:215), which raises without Transformer Engine, and
megatron-core ships TE hybrid specs only, without q/k norm (hybrid_layer_specs.py); (2) it has
no Llama-3 RoPE-scaling argument (hybrid_model.py:247 builds `RotaryEmbedding` without it);
(3) its checkpoints key each sublayer on its own (`decoder.layers.{2i}.input_layernorm.weight`,
`decoder.final_norm.weight`) where `GPTModel` stacks layers (`decoder.layers.self_attention.
linear_qkv.layer_norm_weight` with a layer axis), so checkpoints written so far, the converters'
streaming layout and Megatron-LM's `pretrain_gpt.py` would not load them. Switch when a family
needs non-dense layers (MoE, linear attention) and that format change is accepted.

The shared decoder settings are here; what differs by family (QKV bias, q/k norm, ...) comes
from the family's `transformer_options`. The TE/local choice is made once, here, from the
resolved `transformer_impl`: Transformer Engine layers (required for FP8 and context
parallelism) on GPUs, megatron-core's local layers otherwise.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from rlsd_megatron.config import Config, ConfigError, ModelConfig, VisionConfig
from rlsd_megatron.dtypes import torch_dtype
from rlsd_megatron.models.families import family_of

logger = logging.getLogger(__name__)

def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Vocabulary rows Megatron allocates: rounded up to a multiple of divisible_by * tp."""
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-model.vocab_size // multiple) * multiple


def transformer_config(cfg: Config, *, impl: str):
    """The megatron-core `TransformerConfig` for `cfg` (model, layout, precision)."""
    from megatron.core.transformer import TransformerConfig

    m, p, prec = cfg.model, cfg.parallel, cfg.precision
    dtype = torch_dtype(prec.params_dtype)
    recompute = prec.recompute_granularity if prec.recompute_granularity != "none" else None
    vision: VisionConfig | None = m.vision
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        # Weights are initialised whole on CPU and then split, so any TP/PP layout of the same
        # seed holds the same model (what the parity tests and resharding rely on).
        use_cpu_initialization=True,
        # Weights a checkpoint will overwrite are not drawn: at 70B that is minutes of CPU per rank.
        perform_initialization=not cfg.checkpoint.init_from,
        # The loss functions normalise by global counts themselves; see learner.step.
        calculate_per_token_loss=True,
        variable_seq_lengths=True,
        # MoE: all-to-all runs on gloo too (all_to_all_single; the CPU stream shim of cpu_compat);
        # "allgather" rejects variable sequence lengths.
        moe_token_dispatcher_type="alltoall",
        # One GEMM over all local experts needs Transformer Engine; the local spec loops over them.
        moe_grouped_gemm=bool(m.num_experts) and impl == "transformer_engine",
        recompute_granularity=recompute,
        recompute_method=prec.recompute_method,
        recompute_num_layers=prec.recompute_num_layers,
        fp8=None if prec.fp8 == "none" else prec.fp8,
        fp8_recipe=prec.fp8_recipe,
        fp8_amax_history_len=prec.fp8_amax_history_len,
        fp8_amax_compute_algo="max",
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        # TE's fused RoPE takes one rotation per position for the whole batch; M-RoPE's differ per
        # sequence (megatron-core falls back with a warning), so VL models use the unfused path.
        apply_rope_fusion=impl == "transformer_engine" and vision is None,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        deallocate_pipeline_outputs=True,
        **family_of(m).transformer_options(m),
        mrope_section=list(vision.mrope_section) if vision is not None else None,
    )


class LocalNorm:
    """The local spec's RMSNorm (megatron-core's `WrappedTorchNorm`: `torch.nn.RMSNorm`, as there is
    no Apex), usable under sequence parallelism, which `WrappedTorchNorm` refuses. Under it each
    TP rank normalises its slice of the sequence, so the weight's gradient is a partial sum; the
    `sequence_parallel` mark has `finalize_model_grads` all-reduce it over TP (what Apex's and
    TE's norms do). Sequence parallelism is what megatron-core requires of MoE under TP."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def _local_spec_with_norm(spec, *, qk_layernorm: bool):
    """`spec` (a local GPT layer spec) with its norms (pre-attention, pre-MLP, q/k) as `LocalNorm`."""
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = LocalNorm
    if qk_layernorm:
        layer.self_attention.submodules.q_layernorm = layer.self_attention.submodules.k_layernorm = LocalNorm
    return spec


def layer_spec(config, *, impl: str):
    """The decoder-layer `ModuleSpec` for a `TransformerConfig`: Transformer Engine or
    megatron-core local modules; with `num_moe_experts`, an MoE layer (TE: `TEGroupedMLP` experts,
    local: `SequentialMLP`, one megatron MLP per expert)."""
    from megatron.core.models.gpt import gpt_layer_specs

    experts = {"num_experts": config.num_moe_experts, "moe_grouped_gemm": config.moe_grouped_gemm}
    if impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm, **experts)
    if impl == "local":
        return _local_spec_with_norm(gpt_layer_specs.get_gpt_layer_local_spec(
            qk_layernorm=config.qk_layernorm, normalization="RMSNorm", **experts), qk_layernorm=config.qk_layernorm)
    raise ConfigError(f"transformer_impl must be local or transformer_engine, got {impl!r}")


def build_model_chunks(cfg: Config, *, impl: str) -> list[torch.nn.Module]:
    """This rank's `GPTModel` chunk(s): one per virtual pipeline stage (one without VPP).

    Must be called inside an initialised megatron-core parallel state. Outputs are
    vocabulary-parallel logits (`parallel_output=True`), never gathered.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    m = cfg.model
    config = transformer_config(cfg, impl=impl)
    spec = layer_spec(config, impl=impl)
    vocab = padded_vocab_size(m, cfg.parallel.tp)
    model_class, rope = GPTModel, {"position_embedding_type": "rope"}
    if m.vision is not None:
        from rlsd_megatron.models.vision_config import vl_kind
        from rlsd_megatron.models.vision_language import VisionLanguageModel

        vl_kind(m)  # the decoder is the VL model type's text family
        model_class = functools.partial(VisionLanguageModel, vision=m.vision, freeze_vision_tower=m.freeze_vision_tower)
        rope = {}  # M-RoPE, set by the class
    chunks = []
    stages = cfg.parallel.vpp or 1
    for vp_stage in range(stages):
        vp = vp_stage if cfg.parallel.vpp else None
        block = spec
        if impl == "local":  # the final norm as the layers' (megatron-core would pick WrappedTorchNorm)
            block = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp),
                                               layer_norm=LocalNorm)
        chunk = model_class(
            config=config,
            transformer_layer_spec=block,
            vocab_size=vocab,
            max_sequence_length=m.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            share_embeddings_and_output_weights=m.tie_word_embeddings,
            **rope,
            rotary_base=int(m.rope_theta),
            rope_scaling=m.rope_scaling_factor is not None,
            rope_scaling_factor=m.rope_scaling_factor or 8.0,
            vp_stage=vp,
        )
        chunks.append(chunk)
    return chunks
