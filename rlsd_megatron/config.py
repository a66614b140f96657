"""The one typed configuration tree of rlsd_megatron, loaded from YAML with dotted overrides.

`load_config("examples/configs/rlsd.yaml", ["parallel.tp=2", "optimizer.lr=1e-6"])` reads the
YAML, applies the overrides (values parsed as YAML scalars), rejects unknown keys and
mistyped values, and returns a `Config`. Layout and hardware checks that need the world size
live in `rlsd_megatron.config_checks.validate_config`, called before any process group starts.

Defaults are the spec's reference recipe (`shared/spec/rlsd.md` §5) where it sets a value;
the paper's value is stated next to a field when the library default differs.
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
    """The vision tower of a Qwen2.5-VL policy, in the terms of HF's `vision_config` (read from
    `model.hf_config`), plus where its embeddings go in the text: the image placeholder token and the
    split of each head's rotary channels over (time, height, width) positions (M-RoPE)."""

    depth: int = 2
    hidden_size: int = 32
    intermediate_size: int = 64
    num_heads: int = 2
    out_hidden_size: int = 64  # = the language model's hidden size
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2  # merged patches per side: one image token per merge² patches
    window_size: int = 112  # pixels per side of a windowed-attention window
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [1])  # blocks with full attention
    hidden_act: str = "silu"
    image_token_id: int = 1
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])  # rotary pairs per (t, h, w); sums to head_dim/2


@dataclass
class ModelConfig:
    """Architecture of a Llama / Qwen2 / Qwen3-style decoder.

    Either set `hf_config` (a Hugging Face model directory or config.json; architecture fields
    are then read from it) or the architecture fields directly.
    """

    hf_config: str | None = None
    family: Literal["llama", "qwen2", "qwen3"] = "llama"
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: multi-head attention (no GQA)
    ffn_hidden_size: int = 256
    kv_channels: int | None = None  # head dim; None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama-3.1 style scaling (low 1, high 4, orig 8192)
    norm_epsilon: float = 1e-6
    qkv_bias: bool = False  # Qwen2
    qk_layernorm: bool = False  # Qwen3
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128  # padded vocab: a multiple of this times TP
    init_method_std: float = 0.02
    # A vision-language policy (Qwen2.5-VL): the decoder above plus this vision tower; None: text only.
    vision: VisionConfig | None = None
    freeze_vision_tower: bool = False  # the authors' VL recipe trains it (false)

    def __post_init__(self):
        if isinstance(self.vision, dict):  # ModelConfig(**model_fields_from_hf(...)), a checkpoint's record
            self.vision = VisionConfig(**self.vision)


@dataclass
class ParallelConfig:
    """Megatron parallel layout; data parallelism is what remains of the world size."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved schedule)
    cp: int = 1
    dp: int | None = None  # None: world_size // (tp * pp * cp); if set, it is checked
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True  # only takes effect when dp * cp > 1
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
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

    params_dtype: Literal["fp32", "bf16"] = "fp32"
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    fp8: Literal["none", "e4m3", "hybrid"] = "none"
    # Megatron/TE recipe names: delayed scaling, tensorwise (= per-tensor current scaling),
    # blockwise (DeepSeek-style 1x128/128x128 blocks), mxfp8 (Blackwell only).
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    fp8_amax_history_len: int = 1024
    recompute_granularity: Literal["none", "full", "selective"] = "none"
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None


@dataclass
class OptimizerConfig:
    """AdamW through megatron.core.optimizer (fused Adam from TE/apex when present, torch otherwise)."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    lr_decay_steps: int | None = None  # None: train.steps


@dataclass
class TrainConfig:
    """Step budget and batch arithmetic of the learner."""

    steps: int = 100
    seed: int = 1234
    prompts_per_step: int = 256  # recipe: 256 prompts x G = 8 rollouts
    micro_batch_size: int = 1  # sequences per micro-batch (padded path)
    max_tokens_per_micro_batch: int | None = None  # dynamic micro-batching by token budget
    ppo_epochs: int = 1
    optimizer_steps_per_batch: int = 1  # recipe: one optimizer step per rollout batch
    max_seq_length: int = 2048  # prompt + response, for activation memory and validation
    # Distillation (opsd, sdpo, grpo_opsd): the teacher's logits ([tokens, V/TP] per rank) exist for this many
    # of the student's micro-batches at a time, computed right before their forward/backward and dropped after
    # it (one optimizer step over all of them), so distillation memory is this many micro-batches' teacher
    # logits however large the step. None: parallel.pp; each chunk fills and drains the pipeline once, so with
    # PP > 1 smaller chunks leave stages idle for a larger share of the time.
    distill_chunk_micro_batches: int | None = None
    eval_interval: int = 10  # steps between validation runs (0: only after the last step)


@dataclass
class WarmStartConfig:
    """Optional supervised warm start before RL, on the dataset's (prompt, answer) pairs: for
    models trained from scratch (the built-in CPU demo). Phase 1 trains on plain prompts until
    greedy validation accuracy reaches `stop_accuracy` (measured, not a step count: learning
    has a sharp phase transition); phase 2 mixes in `hint_fraction` hinted prompts until the
    model uses the hint (`hinted_stop_accuracy`), which the self-teacher needs, while still
    solving the plain prompts (`stop_accuracy`). `max_steps`
    bounds both; 0 disables the warm start."""

    max_steps: int = 0
    stop_accuracy: float = 0.25
    hinted_stop_accuracy: float = 0.9
    lr: float = 1e-3
    # Measured on the built-in task (2026-11-25): with 0.1 the task was learned by step 390-530 in 6 of
    # 6 seeds; with the RL's 0.01, by 250-870 in 7 of 9 and not within 1,500 steps in 2.
    weight_decay: float = 0.1
    prompts_per_step: int = 64
    hint_fraction: float = 0.5
    eval_interval: int = 10
    output: str | None = None  # also save the warm-started weights here (a checkpoint.init_from)


@dataclass
class RolloutConfig:
    """Generation. `backend=auto` uses SGLang on GPU and the embedded HF engine on CPU."""

    backend: Literal["auto", "sglang", "embedded"] = "auto"
    n: int = 8  # G: rollouts per prompt (recipe 8)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 4096
    val_temperature: float = 0.7
    val_top_p: float = 0.8
    val_top_k: int = 20
    val_presence_penalty: float = 0.0  # recipe 1.5 (the presets); validation sampling only
    val_n: int = 1
    engine_tp: int = 1
    mem_fraction_static: float = 0.5  # SGLang's share (weights + KV cache) of the GPU memory free at its start
    weight_sync_bucket_mb: int = 512
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


@dataclass
class AlgorithmConfig:
    """The RL objective. One preset per method in examples/configs/ sets the recipe values; what
    a step computes for each method is its record in algorithms/methods.py (same names)."""

    method: Literal["rlsd", "grpo", "dapo", "drgrpo", "opd", "opsd", "sdpo", "grpo_opsd"] = "rlsd"
    normalize_adv_std: bool = True  # False: Dr. GRPO's A = R - mean(R)
    # RLSD (spec §3): λ_s = lam0·max(0, 1 - s/D); ŵ clipped to [1-ε_w, 1+ε_w].
    lam0: float = 0.5
    lam_decay_steps: int | None = 60  # recipe script's D (the paper gives none); None: no decay
    # λ warm-up (authors' rlsd_lambda_warmup_steps): λ_s = lam0·s/W for s < W, then the decay counts
    # from W: lam0·max(0, 1 - (s-W)/D). 0 (the authors' default and the recipe's): no warm-up.
    lam_warmup_steps: int = 0
    # Reweight failed rollouts (A < 0) only; successful ones keep GRPO's A on every token (authors'
    # rlsd_negative_only). False in the authors' default and the recipe.
    negative_only: bool = False
    weight_clip_eps: float = 0.2
    # Surrogate (spec §4): clip-higher 0.2/0.28, dual clip 3.0, token-mean over the global batch.
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 3.0
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    loss_norm_constant: int | None = None  # Dr. GRPO's constant normaliser; None: rollout.max_new_tokens
    # KL to a reference policy (textbook GRPO: 0.04); 0: none, as in the recipe. The estimator of
    # KL(π_θ‖π_ref) per sampled token: k1 = log π_θ − log π_ref, k2 = ½(k1)², k3 = exp(−k1) + k1 − 1,
    # low_var_kl = k3 clamped (veRL).
    kl_coef: float = 0.0
    kl_kind: Literal["k1", "k2", "k3", "low_var_kl"] = "k3"
    # The reference: None = the policy RL starts from (after the warm start / checkpoint.init_from),
    # a frozen copy of its weights, saved in training-state checkpoints; or a Megatron checkpoint path
    # (same vocabulary, any architecture; loaded frozen under the policy's TP/PP layout, like
    # teacher_model).
    kl_reference: str | None = None
    entropy_coef: float = 0.0
    # Which weights score the teacher (spec §2). Library default live; the RLSD recipe uses
    # frozen_sync every 20 steps; OPSD a frozen initial model; SDPO an EMA (rate 0.05);
    # OPD a separate, larger model (teacher_model).
    teacher_weights: Literal["live", "frozen", "frozen_sync", "ema", "separate"] = "live"
    teacher_sync_interval: int = 20
    teacher_ema_rate: float = 0.05
    # OPD's teacher (teacher_weights=separate): a Megatron checkpoint (tools/convert_hf_to_megatron.py,
    # warm_start.output, a checkpoint.dir) of a model with the policy's vocabulary, any size and shape
    # (read from its rlsd_checkpoint.json). Loaded once, frozen, under the policy's TP/PP layout; it
    # scores the student's rollouts in the student's own prompt (no hint). Re-loaded on resume.
    teacher_model: str | None = None
    # The hinted teacher's user turn (rlsd, opsd, grpo_opsd), with {question} and {answer} (the hint:
    # the row's data.solution_key text, else its answer). None: the spec's §2 wording (a built-in
    # task: its own). SDPO's teacher has its own template.
    teacher_template: str | None = None
    # Distillation (OPSD, SDPO, GRPO+OPSD): generalised JSD_β, over the full vocabulary, a top-k
    # support (SDPO: the student's top-100 plus a tail bucket) or the sampled token only.
    distill_loss: Literal["none", "jsd", "topk", "sampled"] = "none"
    distill_coef: float = 1.0
    distill_beta: float = 0.5
    distill_topk: int = 100
    distill_support: Literal["teacher", "student"] = "teacher"
    distill_tail_bucket: bool = True
    sdpo_success_threshold: float = 0.5  # a sibling counts as a demonstration at this reward
    opd_reward_weight: float = 0.0  # OPD: mix in c·A of the verifiable reward
    dynamic_sampling: bool = False  # DAPO: drop all-equal groups and re-sample to fill the batch
    dynamic_sampling_max_rounds: int = 4
    tis_cap: float | None = None  # truncated importance sampling (rollout vs learner log-probs)


@dataclass
class RewardConfig:
    """Math reward: R = accuracy_weight·acc + format_weight·format + overlong penalty."""

    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    think_tag: str = "thought"
    answer_tag: str = "answer"
    overlong_buffer: int = 3072
    overlong_factor: float = 0.1
    overlong_max_length: int = 16384  # recipe: never reached with 4096-token responses
    timeout_s: float = 5.0
    custom_fn: str | None = None  # dotted path "package.module:function"


@dataclass
class DataConfig:
    """Prompts and privileged information."""

    task: str | None = None  # a built-in task name instead of files
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    question_key: str = "question"
    answer_key: str = "answer"
    # A per-row teacher hint (the authors' data.trajectory_key): a column whose text replaces the
    # answer in the teacher template's {answer} slot (cut to max_solution_tokens); rows where it is
    # missing, null or blank fall back to the answer. None: the answer for every row (the recipe,
    # whose trajectory_key is the answer column).
    solution_key: str | None = None
    tokenizer_dir: str | None = None
    max_prompt_length: int = 16384
    max_solution_tokens: int = 12000
    bad_rows: Literal["error", "skip"] = "error"
    shuffle: bool = True


@dataclass
class CheckpointConfig:
    """Training-state checkpoints (model, optimizer, scheduler, RNG, data position, teacher)."""

    dir: str | None = None  # None: no checkpoints
    save_interval: int = 50  # steps (0: only the last); SIGTERM / SIGUSR1 also save (slurm pre-emption)
    keep_last: int = 2  # older iteration directories are deleted
    resume: str | None = None  # "auto" (latest complete one in dir, if any), a checkpoint path, or None
    init_from: str | None = None  # initial weights: a Megatron checkpoint (tools/convert_hf_to_megatron.py)


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    tensorboard: bool = True
    log_interval: int = 1
    progress_bar: bool = True


@dataclass
class Config:
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
