"""The one typed configuration tree of rlsd_megatron, loaded from YAML with dotted overrides.

`load_config("examples/configs/rlsd.yaml", ["parallel.tp=2", "optimizer.lr=1e-6"])` reads the
YAML, applies the overrides (values parsed as YAML scalars), rejects unknown keys and
mistyped values, and returns a `Config`. Layout and hardware checks that need the world size
live in `rlsd_megatron.config_checks.validate_config`, called before any process group starts.

Defaults are the spec's reference recipe (`shared/spec/rlsd.md` §5) where it sets a value.
Every field has a comment (the lines right above it and/or the end of its line): its meaning, its
unit, and the recipe's value where the default differs; `rlsd-train --help-config` prints them
with the types and defaults (`rlsd_megatron.config_help`), so keep each comment next to its field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, with what was wrong and how to fix it."""


@dataclass
class VisionConfig:
    """The vision tower of a Qwen2.5-VL or Qwen3-VL policy, in the terms of HF's `vision_config`
    (read from `model.hf_config`), plus where its embeddings go in the text: the image placeholder
    token and the split of each head's rotary channels over (time, height, width) positions (M-RoPE)."""

    model_type: Literal["qwen2_5_vl", "qwen3_vl"] = "qwen2_5_vl"  # HF model_type: which tower, M-RoPE layout and decoder family
    depth: int = 2  # vision transformer blocks
    hidden_size: int = 32  # vision transformer width
    intermediate_size: int = 64  # vision MLP inner width
    num_heads: int = 2  # vision attention heads
    out_hidden_size: int = 64  # = the language model's hidden size
    in_channels: int = 3  # image channels (RGB)
    patch_size: int = 14  # pixels per patch side
    temporal_patch_size: int = 2  # frames per patch (a still image is repeated)
    spatial_merge_size: int = 2  # merged patches per side: one image token per merge² patches
    window_size: int = 112  # pixels per side of a windowed-attention window
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [1])  # blocks with full attention
    hidden_act: str = "silu"  # the vision MLP's activation
    num_position_embeddings: int = 2304  # Qwen3-VL: learned position grid (a square), resampled to each image
    deepstack_visual_indexes: list[int] = field(default_factory=list)  # Qwen3-VL: ViT blocks whose features DeepStack adds after decoder layers 0, 1, ...
    image_token_id: int = 1  # the placeholder token the image embeddings replace
    video_token_id: int | None = None  # videos are not supported: a sequence holding this token is refused
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])  # rotary pairs per (t, h, w); sums to head_dim/2


@dataclass
class ModelConfig:
    """Architecture of a Llama / Qwen2 / Qwen3-style decoder.

    Either set `hf_config` (a Hugging Face model directory or config.json; architecture fields
    are then read from it) or the architecture fields directly.
    """

    hf_config: str | None = None  # HF model directory or its config.json; the architecture then comes from it
    family: Literal["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe"] = "llama"  # llama (Llama 2/3), qwen2 (QKV bias), qwen3 (QK layernorm), qwen3_moe (Qwen3 with routed experts), qwen2_moe (Qwen2 with routed experts and a gated shared expert)
    vocab_size: int = 128  # tokenizer vocabulary, unpadded (see make_vocab_size_divisible_by)
    hidden_size: int = 64  # model width
    num_layers: int = 2  # decoder layers
    num_attention_heads: int = 4  # query heads
    num_query_groups: int | None = None  # None: multi-head attention (no GQA)
    ffn_hidden_size: int = 256  # SwiGLU MLP inner width
    kv_channels: int | None = None  # head dim; None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # longest position (tokens) the RoPE tables cover
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling_factor: float | None = None  # Llama-3.1 style scaling (low 1, high 4, orig 8192)
    norm_epsilon: float = 1e-6  # RMSNorm epsilon
    qkv_bias: bool = False  # bias on the Q, K, V projections (Qwen2)
    qk_layernorm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)
    tie_word_embeddings: bool = False  # the output layer reuses the input embedding matrix
    make_vocab_size_divisible_by: int = 128  # padded vocab: a multiple of this times TP
    init_method_std: float = 0.02  # std of the normal init of weights no checkpoint overwrites
    # Mixture of experts (families qwen3_moe, qwen2_moe: every layer's MLP is routed experts; HF names in brackets).
    num_experts: int | None = None  # routed experts per layer (num_experts); None: a dense model
    moe_router_topk: int = 2  # experts each token goes to (num_experts_per_tok)
    moe_ffn_hidden_size: int | None = None  # one expert's SwiGLU width (moe_intermediate_size)
    moe_norm_topk_prob: bool = True  # rescale the top-k routing probabilities to sum to 1 (norm_topk_prob)
    # Width of the shared expert every token also goes through, its output scaled by a sigmoid gate
    # (qwen2_moe; shared_expert_intermediate_size); None: no shared expert (qwen3_moe).
    moe_shared_expert_intermediate_size: int | None = None
    # transformers' load-balancing loss weight (HF router_aux_loss_coef, read from model.hf_config; 0 = off);
    # any TP/EP/PP/CP layout (learner/moe_aux_loss.py).
    moe_aux_loss_coeff: float = 0.0
    # A vision-language policy (Qwen2.5-VL, Qwen3-VL): the decoder above plus this vision tower; None: text only.
    vision: VisionConfig | None = None
    freeze_vision_tower: bool = False  # the authors' VL recipe trains it (false)

    def __post_init__(self):
        if isinstance(self.vision, dict):  # ModelConfig(**model_fields_from_hf(...)), a checkpoint's record
            self.vision = VisionConfig(**self.vision)


@dataclass
class ParallelConfig:
    """Megatron parallel layout; data parallelism is what remains of the world size."""

    tp: int = 1  # tensor-parallel size: ranks splitting each layer
    pp: int = 1  # pipeline-parallel size: stages of consecutive layers
    # Virtual pipeline stages per rank (interleaved schedule): model chunks per rank, which shrinks the
    # pipeline bubble by this factor. Needs pp >= 3; micro-batches run in groups of pp.
    vpp: int | None = None
    cp: int = 1  # context-parallel size: ranks splitting each sequence
    # Expert parallelism: each MoE layer's experts are split over ep ranks, carved out of the
    # data-parallel ranks (dense layers stay data-parallel there); experts use tp as their own TP.
    ep: int = 1
    dp: int | None = None  # None: world_size // (tp * pp * cp); if set, it is checked
    sequence_parallel: bool = False  # Megatron SP: activations outside attention/MLP split over the TP ranks
    use_distributed_optimizer: bool = True  # only takes effect when dp * cp > 1
    overlap_grad_reduce: bool = False  # overlap the data-parallel gradient reduction with backward
    # (No overlap_param_gather: megatron-core's overlap of the distributed optimizer's parameter all-gather
    # with the next forward leaves stale shards, yet the RL step reads the weights right after each update
    # (weight sync, teacher copy, checkpoint), so the gather must finish there and saves no time.)
    # Minutes a training collective (Megatron's TP / PP / CP / DP groups) waits before it fails
    # (on GPUs NCCL's flight recorder then dumps every rank's last collectives); torch's default is 30.
    collective_timeout_minutes: float = 10.0
    # Minutes a rank waits for another's long work alone: generation and verification on the
    # engine host, the engine's start-up, checkpoint writes (the world and replica groups).
    wait_timeout_minutes: float = 60.0
    # GPU nodes: bind each rank to whole cores of its GPU's socket, helper processes (SGLang, verifiers)
    # to the node's cores (parallel/cpu_binding.py); srun starts the ranks unbound (slurm/common.sh).
    bind_cpus: bool = True


@dataclass
class PrecisionConfig:
    """Numerics. `transformer_impl=auto` picks Transformer Engine on a GPU with TE, local otherwise."""

    params_dtype: Literal["fp32", "bf16"] = "fp32"  # weights, activations, rollout engine; recipe bf16 (presets)
    # transformer_engine (fused kernels, needed for FP8) or megatron-core's local torch layers; auto: see above.
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    fp8: Literal["none", "e4m3", "hybrid"] = "none"  # FP8 training (TE): e4m3, or hybrid (e4m3 forward, e5m2 grads)
    # Megatron/TE recipe names: delayed scaling, tensorwise (= per-tensor current scaling),
    # blockwise (DeepSeek-style 1x128/128x128 blocks), mxfp8 (Blackwell only).
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    fp8_amax_history_len: int = 1024  # delayed scaling: steps of amax history a scale is taken from
    # Activation recomputation in backward: full (whole layers, as recompute_method says), selective
    # (the attention core only) or none.
    recompute_granularity: Literal["none", "full", "selective"] = "none"
    # Full recomputation: uniform (every layer, in groups of recompute_num_layers) or block (only the
    # first recompute_num_layers layers of each pipeline stage).
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None  # the layer count recompute_method uses


@dataclass
class OptimizerConfig:
    """AdamW through megatron.core.optimizer (fused Adam from TE/apex when present, torch otherwise)."""

    lr: float = 1e-6  # peak learning rate (recipe 1e-6)
    min_lr: float = 0.0  # where the decay ends
    weight_decay: float = 0.01  # AdamW decoupled weight decay (recipe 0.01)
    adam_beta1: float = 0.9  # AdamW β1
    adam_beta2: float = 0.999  # AdamW β2
    adam_eps: float = 1e-8  # AdamW ε
    clip_grad: float = 1.0  # global gradient-norm clip (recipe 1.0)
    lr_warmup_steps: int = 0  # optimizer steps of linear warm-up from 0 to lr
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"  # schedule from lr to min_lr after the warm-up
    lr_decay_steps: int | None = None  # optimizer steps of warm-up + decay; None: train.steps


@dataclass
class TrainConfig:
    """Step budget and batch arithmetic of the learner."""

    steps: int = 100  # RL steps, one rollout batch each
    seed: int = 1234  # model init, data order and the rollouts' sampling seeds
    prompts_per_step: int = 256  # recipe: 256 prompts x G = 8 rollouts
    micro_batch_size: int = 1  # sequences per micro-batch (padded path)
    max_tokens_per_micro_batch: int | None = None  # dynamic micro-batching by token budget
    ppo_epochs: int = 1  # passes over each rollout batch (recipe 1)
    optimizer_steps_per_batch: int = 1  # recipe: one optimizer step per rollout batch
    max_seq_length: int = 2048  # prompt + response tokens, for activation memory and validation (recipe 20480)
    # Distillation (opsd, sdpo, grpo_opsd): the teacher's logits ([tokens, V/TP] per rank) exist for this many
    # of the student's micro-batches at a time, computed right before their forward/backward and dropped after
    # it (one optimizer step over all of them), so distillation memory is this many micro-batches' teacher
    # logits however large the step. None: parallel.pp; each chunk fills and drains the pipeline once, so with
    # PP > 1 smaller chunks leave stages idle for a larger share of the time.
    distill_chunk_micro_batches: int | None = None
    eval_interval: int = 10  # steps between validation runs (0: only after the last step)
    # Fuse the output layer with the log-prob / entropy op (ops/fused_output.py): the logits exist for
    # `fused_output_chunk_tokens` tokens at a time, never for the whole micro-batch ([tokens, V/TP] fp32);
    # the backward recomputes each chunk's matmul. Not with distillation losses on whole distributions.
    fused_output_layer: bool = False
    # Tokens per chunk of the fused output layer (its logits: chunk x V/TP fp32). 512: at 8K tokens x 152K
    # vocabulary 0.079x the unfused path's memory at 0.96x its CPU time (benchmarks/fused_output.py).
    fused_output_chunk_tokens: int = 512
    # Skip the score phase's forward of the student: with one optimizer step per rollout batch (ppo_epochs x
    # optimizer_steps_per_batch = 1) the ratio's old log-probs are the current policy's, which the update's own
    # forward computes with the same weights on the same micro-batches, so the loss takes them from there
    # (detached) and computes the token advantages (RLSD's teacher weights, OPD's log-ratio), TIS weights and the
    # engine mismatch from them, per token (trainer/in_update.py). Same update bit for bit; the advantage and
    # mismatch metrics become means over micro-batches, and rollout.max_logprob_mismatch (a check *before* the
    # update) cannot be used with it.
    student_log_probs_in_update: bool = False
    # Move the learner's weights, gradients and optimizer state off the GPU while the colocated engine generates
    # (after the weight sync) and back before scoring (learner/offload.py), so the engine can take the learner's
    # memory (rollout.mem_fraction_static; the planner counts it). none | copy (pinned host buffers, any device) |
    # torch_memory_saver (GPU: pause / resume of the learner's allocations, the [gpu] extra's package).
    offload: Literal["none", "copy", "torch_memory_saver"] = "none"
    # Benchmarks evaluated with the validation, every eval_interval steps and after the last: a YAML list in
    # rlsd-eval's format (rlsd_megatron/eval/benchmarks.py), logged as eval/<name>/avg@n, pass@k, maj@n, ...
    # None: none.
    eval_sets: str | None = None
    # 1: one-step-off-policy (needs rollout.placement=separate): step n+1's prompts go to the engines before
    # step n trains, so they are generated with the weights of before step n's update while the learner
    # trains; a batch is at most this many updates stale. The policy ratio is then taken against the
    # engine's log-probs (the behaviour policy), or with algorithm.tis_cap against the learner's
    # recomputed ones with the TIS weight correcting for the engine. A checkpoint holds the batch generated for
    # the next step, so a resumed run equals an uninterrupted one. 0: synchronous (on-policy).
    off_policy_steps: int = 0


@dataclass
class WarmStartConfig:
    """Optional supervised warm start before RL, on the dataset's (prompt, answer) pairs: for
    models trained from scratch (the built-in CPU demo). Phase 1 trains on plain prompts until
    greedy validation accuracy reaches `stop_accuracy` (measured, not a step count: learning
    has a sharp phase transition); phase 2 mixes in `hint_fraction` hinted prompts until the
    model uses the hint (`hinted_stop_accuracy`), which the self-teacher needs, while still
    solving the plain prompts (`stop_accuracy`). `max_steps`
    bounds both; 0 disables the warm start."""

    max_steps: int = 0  # supervised steps at most, both phases; 0: no warm start
    stop_accuracy: float = 0.25  # greedy accuracy on plain validation prompts that ends phase 1
    hinted_stop_accuracy: float = 0.9  # greedy accuracy on hinted prompts that ends phase 2
    lr: float = 1e-3  # constant learning rate of the supervised steps
    # AdamW weight decay of the supervised steps. Measured on the built-in task (2026-11-25): with 0.1
    # the task was learned by step 390-530 in 6 of 6 seeds; with the RL's 0.01, by 250-870 in 7 of 9
    # and not within 1,500 steps in 2.
    weight_decay: float = 0.1
    prompts_per_step: int = 64  # (prompt, answer) pairs per supervised step
    hint_fraction: float = 0.5  # phase 2: share of the prompts shown with the teacher's hint
    eval_interval: int = 10  # supervised steps between accuracy checks
    output: str | None = None  # also save the warm-started weights here (a checkpoint.init_from)


@dataclass
class RolloutConfig:
    """Generation. `backend=auto` uses SGLang on GPU and the embedded HF engine on CPU."""

    backend: Literal["auto", "sglang", "embedded"] = "auto"  # embedded: HF transformers in the trainer's process (CPU)
    n: int = 8  # G: rollouts per prompt (recipe 8)
    temperature: float = 1.0  # sampling temperature; log-probs use logits / T too (recipe 1.0)
    top_p: float = 1.0  # nucleus sampling; 1.0: off (recipe)
    top_k: int = -1  # top-k sampling; -1: off
    max_new_tokens: int = 4096  # response length limit in tokens (recipe 4096)
    val_temperature: float = 0.7  # validation sampling (recipe 0.7)
    val_top_p: float = 0.8  # validation nucleus sampling (recipe 0.8)
    val_top_k: int = 20  # validation top-k (recipe 20)
    val_presence_penalty: float = 0.0  # recipe 1.5 (the presets); validation sampling only
    val_n: int = 1  # samples per validation prompt (recipe 1)
    engine_tp: int = 1  # SGLang tensor parallelism: GPUs per engine (independent of parallel.tp)
    mem_fraction_static: float = 0.5  # SGLang's share (weights + KV cache) of the GPU memory free at its start
    weight_sync_bucket_mb: int = 512  # MiB per bucket of weights pushed to the engine
    max_logprob_mismatch: float | None = None  # error when mean |logp_learner - logp_engine| exceeds it
    # Push the projection weights to SGLang as FP8 (e4m3, one fp32 scale per 128x128 block, quantised on
    # each sync; rollout/fp8.py): half the bytes and FP8 GEMMs in the engine, log-probs drift further from
    # the learner's. Needs bf16 params and an engine whose config.json declares block-wise FP8 (any
    # engine started without model.hf_config does). Not for the embedded engine.
    fp8_weights: bool = False
    # Reproducible rollouts on GPU: SGLang's deterministic inference, the only mode in which it honours
    # the per-sample seeds the trainer sends (batch-invariant kernels, pytorch sampler: slower). The
    # embedded CPU engine is always seeded.
    deterministic: bool = False
    # Extra `sglang.Engine` arguments (ServerArgs fields), e.g. {attention_backend: fa3,
    # cuda_graph_max_bs: 256}; they override ours.
    sglang_server_args: dict[str, Any] = field(default_factory=dict)
    # Where the engines run. colocated: each model replica's first rank hosts its engine on the
    # learner's own GPUs (asleep during the update); separate: the job's last `engine_ranks` ranks
    # (processes/GPUs) host one engine each, never join Megatron's groups, get the learner's
    # weights by broadcast and serve the replicas' prompts (rollout/separate.py): with fewer engines
    # than replicas, replicas share one; with more, each replica splits its prompts over several.
    placement: Literal["colocated", "separate"] = "colocated"
    engine_ranks: int = 0  # with placement=separate: how many of the job's ranks (the last ones) are engines
    # Routing replay (R3; MoE policies): the engine records the top-k experts it routed each token to
    # (SGLang: enable_return_routed_experts), and the learner's routers use exactly those, with their
    # own probabilities for them, in the policy's forwards on the rollouts (old log-probs and update;
    # learner/routing_replay.py), so that routing is no source of train/rollout mismatch.
    routing_replay: bool = False


@dataclass
class AlgorithmConfig:
    """The RL objective. One preset per method in examples/configs/ sets the recipe values; what
    a step computes for each method is its record in algorithms/methods.py (same names)."""

    # rlsd or a baseline (spec §6): which advantage, teacher and loss a step computes.
    method: Literal["rlsd", "grpo", "dapo", "drgrpo", "opd", "opsd", "sdpo", "grpo_opsd"] = "rlsd"
    normalize_adv_std: bool = True  # False: Dr. GRPO's A = R - mean(R)
    # RLSD (spec §3): λ_s = lam0·max(0, 1 - s/D); ŵ clipped to [1-ε_w, 1+ε_w].
    lam0: float = 0.5  # λ0 (recipe 0.5)
    lam_decay_steps: int | None = 60  # recipe script's D (the paper gives none); None: no decay
    # λ warm-up (authors' rlsd_lambda_warmup_steps): λ_s = lam0·s/W for s < W, then the decay counts
    # from W: lam0·max(0, 1 - (s-W)/D). 0 (the authors' default and the recipe's): no warm-up.
    lam_warmup_steps: int = 0
    # Reweight failed rollouts (A < 0) only; successful ones keep GRPO's A on every token (authors'
    # rlsd_negative_only). False in the authors' default and the recipe.
    negative_only: bool = False
    weight_clip_eps: float = 0.2  # ε_w (recipe 0.2)
    # Surrogate (spec §4): clip-higher 0.2/0.28, dual clip 3.0, token-mean over the global batch.
    clip_low: float = 0.2  # the ratio is clipped below at 1 - clip_low
    clip_high: float = 0.28  # ... and above at 1 + clip_high (clip-higher; textbook GRPO 0.2)
    dual_clip: float | None = 3.0  # A < 0 tokens: loss capped at -A·dual_clip; None: off
    # How token losses are averaged: token-mean over every response token of the global batch;
    # seq-mean-token-mean: per sequence, then over sequences (textbook GRPO); seq-mean-token-sum-norm:
    # per-sequence sums over a constant (Dr. GRPO, loss_norm_constant).
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    loss_norm_constant: int | None = None  # Dr. GRPO's constant normaliser; None: rollout.max_new_tokens
    kl_coef: float = 0.0  # weight of the KL to a reference policy (textbook GRPO 0.04); 0: none (recipe)
    # The estimator of KL(π_θ‖π_ref) per sampled token: k1 = log π_θ − log π_ref, k2 = ½(k1)²,
    # k3 = exp(−k1) + k1 − 1, low_var_kl = k3 clamped (veRL).
    kl_kind: Literal["k1", "k2", "k3", "low_var_kl"] = "k3"
    # The reference: None = the policy RL starts from (after the warm start / checkpoint.init_from),
    # a frozen copy of its weights, saved in training-state checkpoints; or a Megatron checkpoint path
    # (same vocabulary, any architecture; loaded frozen under the policy's TP/PP layout, like
    # teacher_model).
    kl_reference: str | None = None
    entropy_coef: float = 0.0  # weight of an entropy bonus; 0: none (recipe)
    # Which weights score the teacher (spec §2). Library default live; the RLSD recipe uses
    # frozen_sync every 20 steps; OPSD a frozen initial model; SDPO an EMA (rate 0.05);
    # OPD a separate, larger model (teacher_model).
    teacher_weights: Literal["live", "frozen", "frozen_sync", "ema", "separate"] = "live"
    teacher_sync_interval: int = 20  # frozen_sync: steps between re-syncs from the policy (recipe 20)
    teacher_ema_rate: float = 0.05  # ema: θ_T ← (1 − rate)·θ_T + rate·θ after each update (SDPO 0.05)
    # OPD's teacher (teacher_weights=separate): a Megatron checkpoint (tools/convert_hf_to_megatron.py,
    # warm_start.output, a checkpoint.dir) of a model with the policy's vocabulary, any size and shape
    # (read from its rlsd_checkpoint.json). Loaded once, frozen, under the policy's TP/PP layout; it
    # scores the student's rollouts in the student's own prompt (no hint). Re-loaded on resume.
    teacher_model: str | None = None
    # The hinted teacher's user turn (rlsd, opsd, grpo_opsd), with {question} and {answer} (the hint:
    # the row's data.solution_key text, else its answer). None: the spec's §2 wording (a built-in
    # task: its own). SDPO's teacher has its own template.
    teacher_template: str | None = None
    # Distillation (OPSD, SDPO, GRPO+OPSD): jsd: generalised JSD_β over the full vocabulary; topk: over a
    # top-k support (SDPO: the student's top-100 plus a tail bucket); sampled: no loss on distributions but
    # the token advantage log π_T − log π_S of the sampled token, an estimate of the reverse KL(S‖T) whatever
    # distill_beta (which, like the topk fields, plays no part there).
    distill_loss: Literal["none", "jsd", "topk", "sampled"] = "none"  # none: no distillation loss (the RL methods)
    # Weight of the distillation term (jsd / topk: of the loss; sampled: of its reverse-KL advantage).
    # OPD's reverse-KL advantage is unweighted (opd_reward_weight weighs the verifier against it).
    distill_coef: float = 1.0
    distill_beta: float = 0.5  # jsd, topk: β of JSD_β: 0 gives KL(T‖S), 1 gives KL(S‖T) (OPSD, SDPO 0.5)
    distill_topk: int = 100  # topk: support size (SDPO 100)
    distill_support: Literal["teacher", "student"] = "teacher"  # topk: whose top-k ids form the support (SDPO: student)
    distill_tail_bucket: bool = True  # topk: one more bucket for the mass outside the support
    sdpo_success_threshold: float = 0.5  # a sibling counts as a demonstration (correct) at this reward
    # SDPO: which siblings its teacher sees (spec §6). first_success: official SDPO (lasgroup/SDPO), the
    # first successful sibling in official SDPO's reprompt template after the student's own user text.
    # shortest_correct_and_incorrect: the RLSD paper's SDPO run (iie-ycx/RLSD@93e46f7, opsd_trainer.py
    # _select_sdpo_feedback + format_prompt/sdpo_teacher.jinja): the sibling with the fewest tokens
    # among those at reward >= sdpo_success_threshold and among the others, both in the authors'
    # template after the raw question; the sample has a teacher when it has either. The authors draw a
    # separate pool of 8 candidates per prompt; here the pool is the rollout's siblings (not itself).
    sdpo_demonstrations: Literal["first_success", "shortest_correct_and_incorrect"] = "first_success"
    # SDPO: drop the sibling's <reward.think_tag>…</…> spans before its teacher sees it, leaving its
    # answer part (SDPO's remove_thinking_from_demonstration, default on).
    sdpo_remove_thinking: bool = True
    opd_reward_weight: float = 0.0  # OPD: mix in c·A of the verifiable reward
    dynamic_sampling: bool = False  # DAPO: drop all-equal groups and re-sample to fill the batch
    dynamic_sampling_max_rounds: int = 4  # DAPO: generation rounds per step at most to fill the batch
    tis_cap: float | None = None  # truncated importance sampling (rollout vs learner log-probs)


@dataclass
class RewardConfig:
    """Math reward: R = accuracy_weight·acc + format_weight·format + overlong penalty."""

    accuracy_weight: float = 0.9  # × the verifier's 0/1 accuracy (recipe 0.9)
    format_weight: float = 0.1  # × the 0/1 format score (recipe 0.1)
    think_tag: str = "thought"  # format: <thought>…</thought> first (common alternative: think)
    answer_tag: str = "answer"  # format, and accuracy reads <answer>…</answer> (else the last \boxed{})
    overlong_buffer: int = 3072  # tokens before overlong_max_length the penalty ramps over (recipe 3072)
    overlong_factor: float = 0.1  # the penalty reaches -factor at overlong_max_length (recipe 0.1)
    overlong_max_length: int = 16384  # recipe: never reached with 4096-token responses
    timeout_s: float = 5.0  # seconds per answer for the verifier (math or custom); a timeout scores 0
    custom_fn: str | None = None  # "package.module:function" replacing the math reward (rewards/custom.py)


@dataclass
class DataConfig:
    """Prompts and privileged information."""

    task: str | None = None  # a built-in task instead of files: reversed_addition, visual_reversed_addition (VL)
    train_files: list[str] = field(default_factory=list)  # .jsonl / .json / .parquet files, one prompt per row
    val_files: list[str] = field(default_factory=list)  # validation rows, same format; empty: no validation
    question_key: str = "question"  # column holding the raw problem text
    answer_key: str = "answer"  # column holding the ground-truth answer
    # A per-row teacher hint (the authors' data.trajectory_key): a column whose text replaces the
    # answer in the teacher template's {answer} slot (cut to max_solution_tokens); rows where it is
    # missing, null or blank fall back to the answer. None: the answer for every row (the recipe,
    # whose trajectory_key is the answer column).
    solution_key: str | None = None
    tokenizer_dir: str | None = None  # HF tokenizer directory (with its chat template)
    max_prompt_length: int = 16384  # tokens; a longer prompt is a bad row (recipe 16384)
    max_solution_tokens: int = 12000  # the teacher's hint is cut to this many tokens (recipe 12000)
    # A malformed or too long row: error (stop, naming file and row) or skip (counted, warned).
    bad_rows: Literal["error", "skip"] = "error"
    shuffle: bool = True  # training rows in a new seeded order each epoch
    # Image+text rows (a vision-language model.vision): the column of each row's images (bytes,
    # {"bytes", "path"} dicts or paths), one `<image>` placeholder per image in the question.
    image_key: str = "images"
    min_pixels: int = 262144  # images smaller than this are upscaled to it, keeping the aspect (recipe 262144)
    max_pixels: int = 1048576  # images larger than this are downscaled to it (recipe 1048576)
    max_source_image_pixels: int = 89478485  # a stored image with more pixels is a bad row (PIL's bomb limit)


@dataclass
class CheckpointConfig:
    """Training-state checkpoints (model, optimizer, scheduler, RNG, data position, teacher)."""

    dir: str | None = None  # None: no checkpoints
    save_interval: int = 50  # steps (0: only the last); SIGTERM / SIGUSR1 also save (slurm pre-emption)
    keep_last: int = 2  # older iteration directories are deleted (0: none is)
    resume: str | None = None  # "auto" (latest complete one in dir, if any), a checkpoint path, or None
    init_from: str | None = None  # initial weights: a Megatron checkpoint (tools/convert_hf_to_megatron.py)


@dataclass
class LoggingConfig:
    """Metrics: tensorboard event files and the console progress line."""

    dir: str = "runs/default"  # tensorboard event files go here
    tensorboard: bool = True  # write tensorboard event files
    log_interval: int = 1  # steps between console progress lines (validation steps always print one)
    progress_bar: bool = True  # print the console progress line


@dataclass
class Config:
    """The whole tree; a YAML config sets any of its sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` converted to `annotation` (int→float only), or raise a ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {annotation}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping with string keys, got {value!r}")
        _, value_type = typing.get_args(annotation)
        return {k: _check_value(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_check_value(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "1e-6" (no dot) as a string; accept any text float() accepts.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, raw: dict, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}".lstrip(".")
        annotation = hints[name]
        optional = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(optional) == 1 and dataclasses.is_dataclass(optional[0]) and value is not None:
            annotation = optional[0]  # an optional sub-section (`model.vision`)
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value, key)
        else:
            kwargs[name] = _check_value(value, annotation, key)
    return cls(**kwargs)


def apply_override(raw: dict, override: str) -> None:
    """Apply one `section.key=value` override to a raw config mapping (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. parallel.tp=2")
    path, text = override.split("=", 1)
    keys = path.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(text) if text.strip() else None


def config_from_dict(raw: dict) -> Config:
    """Build a `Config` from a nested mapping; HF model configs are resolved here."""
    raw = dict(raw)
    model = dict(raw.get("model") or {})
    if model.get("hf_config"):
        from rlsd_megatron.models.hf_config import model_fields_from_hf

        derived = model_fields_from_hf(model["hf_config"])
        clashes = {k: (v, derived[k]) for k, v in model.items() if k in derived and v != derived[k]}
        if clashes:
            detail = ", ".join(f"model.{k}={mine!r} but the HF config says {theirs!r}" for k, (mine, theirs) in clashes.items())
            raise ConfigError(f"{detail}; remove these keys (model.hf_config defines the architecture)")
        raw["model"] = {**derived, **model}
    return _build(Config, raw, "")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply dotted overrides, return a `Config`."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def config_to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts (for YAML dumps, logs and checkpoints)."""
    return dataclasses.asdict(cfg)
