"""Checks of a `Config` against the world it will run in, done before any process group starts.

Every problem found is reported at once, each with the values seen and a way to fix it.
"""

from __future__ import annotations

from rlsd_megatron.config import AlgorithmConfig, Config, ConfigError


def transformer_engine_available() -> bool:
    """Whether Transformer Engine's PyTorch binding imports (it needs torch imported first)."""
    try:
        import torch  # noqa: F401  (TE's binding needs torch's libraries loaded first)
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, FileNotFoundError):
        return False
    return True


def resolve_transformer_impl(cfg: Config, *, cuda_available: bool, te_available: bool) -> str:
    """`local` or `transformer_engine`: what `precision.transformer_impl=auto` means here."""
    impl = cfg.precision.transformer_impl
    if impl == "auto":
        return "transformer_engine" if cuda_available and te_available else "local"
    return impl


def layout_problems(cfg: Config, world_size: int) -> list[str]:
    """Divisibility problems of the parallel layout for this model and world size."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    problems = []
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % p.tp:
        problems.append(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}; "
            f"pick a tp that divides it"
        )
    if m.num_attention_heads % groups:
        problems.append(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={groups}"
        )
    if groups % p.tp:
        problems.append(
            f"model.num_query_groups={groups} is not divisible by parallel.tp={p.tp}; "
            f"use tp <= {groups} that divides it (Megatron does not replicate KV heads)"
        )
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        problems.append(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}; set model.kv_channels (the head dim) explicitly"
        )
    if m.ffn_hidden_size % p.tp:
        problems.append(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}")
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        what = f"parallel.pp*parallel.vpp={p.pp}*{p.vpp}" if p.vpp else f"parallel.pp={p.pp}"
        problems.append(f"model.num_layers={m.num_layers} is not divisible by {what}; change pp/vpp")
    if p.vpp is not None and p.pp < 2:
        problems.append(f"parallel.vpp={p.vpp} needs parallel.pp >= 2 (interleaved pipeline); unset vpp")
    if p.cp > 1 and t.max_seq_length % (2 * p.cp):
        problems.append(
            f"train.max_seq_length={t.max_seq_length} is not divisible by 2*parallel.cp={2 * p.cp} "
            f"(context parallelism splits each sequence into 2*cp load-balanced chunks)"
        )
    for name in ("collective_timeout_minutes", "wait_timeout_minutes"):
        if getattr(p, name) <= 0:
            problems.append(f"parallel.{name}={getattr(p, name)} must be > 0 (minutes)")
    if p.wait_timeout_minutes < p.collective_timeout_minutes:
        problems.append(
            f"parallel.wait_timeout_minutes={p.wait_timeout_minutes} is shorter than parallel.collective_timeout_minutes="
            f"{p.collective_timeout_minutes}; it covers the long waits (generation, start-up, checkpoints): raise it"
        )
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        problems.append(
            f"world size {world_size} is not divisible by tp*pp*cp={p.tp}*{p.pp}*{p.cp}={model_parallel}; "
            f"launch a multiple of {model_parallel} processes or change the layout"
        )
    else:
        dp = world_size // model_parallel
        if p.dp is not None and p.dp != dp:
            problems.append(
                f"parallel.dp={p.dp} but world size {world_size} = tp*pp*cp*dp gives dp={dp}; "
                f"unset parallel.dp or launch {model_parallel * p.dp} processes"
            )
        sequences = t.prompts_per_step * cfg.rollout.n
        per_update = dp * t.optimizer_steps_per_batch
        if sequences % per_update:
            problems.append(
                f"train.prompts_per_step*rollout.n={t.prompts_per_step}*{cfg.rollout.n}={sequences} sequences "
                f"cannot be split evenly over dp={dp} ranks x train.optimizer_steps_per_batch="
                f"{t.optimizer_steps_per_batch}"
            )
        elif t.max_tokens_per_micro_batch is None and (sequences // per_update) % t.micro_batch_size:
            problems.append(
                f"{sequences // per_update} sequences per rank and optimizer step are not a multiple of "
                f"train.micro_batch_size={t.micro_batch_size}"
            )
        elif p.vpp is not None and sequences // per_update < p.pp:
            problems.append(
                f"{sequences // per_update} sequences per rank and optimizer step: the interleaved schedule "
                f"(parallel.vpp) needs at least parallel.pp={p.pp} micro-batches"
            )
    if t.distill_chunk_micro_batches is not None and t.distill_chunk_micro_batches < 1:
        problems.append(f"train.distill_chunk_micro_batches={t.distill_chunk_micro_batches} must be >= 1 "
                        "(micro-batches whose teacher logits are held at a time), or null for parallel.pp")
    if p.sequence_parallel and p.tp == 1:
        problems.append("parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.vpp is not None and p.pp == 2:
        # At pp=2 the next and the previous stage are the same rank. megatron-core exchanges an
        # activation for the next stage and a gradient for the previous one in one batch of p2p
        # operations (and their shapes first: our micro-batches differ in width), and sends to one
        # peer pair with its receives in posting order, so the two swap (on CPU: grad norm 521 vs
        # 4.50 at pp=2 alone, or a shape error). Megatron-LM long required pp > 2 for interleaving.
        problems.append(f"parallel.vpp={p.vpp} with parallel.pp=2: the interleaved schedule swaps activations and "
                        "gradients between two stages; use parallel.pp >= 3 or unset vpp")
    if p.vpp is not None and t.distill_chunk_micro_batches is not None and t.distill_chunk_micro_batches % p.pp:
        problems.append(f"train.distill_chunk_micro_batches={t.distill_chunk_micro_batches} is not a multiple of "
                        f"parallel.pp={p.pp}: the interleaved schedule (parallel.vpp) runs micro-batches in groups "
                        "of pp")
    return problems + expert_problems(cfg, world_size) + deepstack_problems(cfg)


def deepstack_problems(cfg: Config) -> list[str]:
    """What Qwen3-VL's DeepStack (`model.vision.deepstack_visual_indexes`) cannot run with: its
    decoder layers 0..k-1 off the first pipeline stage, or full activation recompute
    (`models.vision_language` says why)."""
    m, p = cfg.model, cfg.parallel
    count = len(m.vision.deepstack_visual_indexes) if m.vision is not None else 0
    if not count:
        return []
    problems = []
    first_stage = m.num_layers // (p.pp * (p.vpp or 1))
    if first_stage < count:
        problems.append(
            f"DeepStack adds image features after decoder layers 0..{count - 1}, which must be on the first pipeline "
            f"stage with the vision tower; parallel.pp={p.pp}, vpp={p.vpp} put {first_stage} of "
            f"model.num_layers={m.num_layers} there: use at most {m.num_layers // count} layer chunks (pp*vpp)")
    if cfg.precision.recompute_granularity == "full":
        problems.append("DeepStack does not support precision.recompute_granularity=full yet (the recompute would "
                        "rerun its layers without the image features); use selective or none")
    return problems


def expert_problems(cfg: Config, world_size: int) -> list[str]:
    """Divisibility problems of expert parallelism (`parallel.ep`) for this model and world size."""
    m, p = cfg.model, cfg.parallel
    if p.ep < 1:
        return [f"parallel.ep={p.ep} must be >= 1"]
    if not m.num_experts:
        return [] if p.ep == 1 else [f"parallel.ep={p.ep} needs an MoE model (model.num_experts); set ep=1"]
    problems = []
    if m.num_experts % p.ep:
        problems.append(f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}; "
                        "every expert-parallel rank holds the same number of experts")
    if m.moe_router_topk > m.num_experts:
        problems.append(f"model.moe_router_topk={m.moe_router_topk} exceeds model.num_experts={m.num_experts}")
    width = m.moe_ffn_hidden_size or m.ffn_hidden_size
    if width % p.tp:
        problems.append(f"model.moe_ffn_hidden_size={width} is not divisible by parallel.tp={p.tp} "
                        "(experts are tensor-parallel over tp)")
    shared = m.moe_shared_expert_intermediate_size
    if shared and shared % p.tp:
        problems.append(f"model.moe_shared_expert_intermediate_size={shared} is not divisible by parallel.tp={p.tp} "
                        "(the shared expert is tensor-parallel like a dense MLP)")
    if m.moe_aux_loss_coeff < 0:
        problems.append(f"model.moe_aux_loss_coeff={m.moe_aux_loss_coeff} is negative; 0 turns the loss off")
    if p.tp > 1 and not p.sequence_parallel:
        problems.append(f"an MoE model under parallel.tp={p.tp} needs parallel.sequence_parallel=true "
                        "(megatron-core refuses MoE with TP alone)")
    # Megatron's expert layout: tp x ep x expert-dp x pp; EP ranks come out of the data-parallel ones.
    if world_size % (p.tp * p.ep * p.pp):
        problems.append(f"world size {world_size} is not divisible by tp*ep*pp={p.tp}*{p.ep}*{p.pp}="
                        f"{p.tp * p.ep * p.pp}; launch a multiple of it or lower parallel.ep")
    return problems


def algorithm_problems(cfg: Config) -> list[str]:
    """Method settings that contradict each other (the method's record: `algorithms/methods.py`)."""
    from rlsd_megatron.algorithms.methods import METHODS, get_method

    a, problems = cfg.algorithm, []
    method = get_method(a.method)
    if cfg.train.fused_output_layer and method.distills and a.distill_loss in ("jsd", "topk"):
        problems.append(
            f"train.fused_output_layer=true computes token log-probs and entropy only, but algorithm.method={a.method} "
            f"with distill_loss={a.distill_loss} needs whole distributions: set train.fused_output_layer=false or "
            "algorithm.distill_loss=sampled")
    if cfg.train.fused_output_chunk_tokens < 1:
        problems.append(f"train.fused_output_chunk_tokens={cfg.train.fused_output_chunk_tokens} must be >= 1")
    separate = [m.name for m in METHODS.values() if m.separate_teacher]
    distilling = [m.name for m in METHODS.values() if m.distills]
    if method.separate_teacher and (a.teacher_weights != "separate" or not a.teacher_model):
        problems.append(
            f"algorithm.method={a.method} scores rollouts with a separate teacher: set "
            "algorithm.teacher_weights=separate and algorithm.teacher_model=<checkpoint> (got "
            f"teacher_weights={a.teacher_weights}, teacher_model={a.teacher_model})"
        )
    if a.teacher_weights == "separate" and not method.separate_teacher:
        problems.append(f"algorithm.teacher_weights=separate is only for method {' or '.join(separate)}, "
                        f"not {a.method}")
    if not method.has_teacher and a.teacher_weights in ("frozen", "frozen_sync", "ema"):
        # The trainer would still keep the copy (an fp32 one for ema), update it every step and checkpoint it.
        teachers = [m.name for m in METHODS.values() if m.has_teacher and not m.separate_teacher]
        problems.append(f"algorithm.teacher_weights={a.teacher_weights} has no effect with method {a.method}, which has "
                        "no teacher, but would keep a copy of the policy's weights (memory, checkpoints); set "
                        f"algorithm.teacher_weights=live, or use method {', '.join(teachers)}")
    if method.distills and a.distill_loss == "none":
        problems.append(f"algorithm.method={a.method} trains with a distillation loss: set algorithm.distill_loss "
                        "(jsd, topk or sampled)")
    if not method.distills and a.distill_loss != "none":
        problems.append(f"algorithm.distill_loss={a.distill_loss} has no effect with method {a.method}; "
                        f"use method {', '.join(distilling[:-1])} or {distilling[-1]}, or set distill_loss=none")
    # OPD's advantage holds the group-normalised one only when it mixes the reward in.
    uses_group_baseline = method.token_advantage in ("sequence", "rlsd") or (
        method.token_advantage == "opd" and a.opd_reward_weight != 0)
    if uses_group_baseline and cfg.rollout.n < 2:
        problems.append(f"algorithm.method={a.method} needs rollout.n >= 2 (a group baseline), got {cfg.rollout.n}")
    if a.distill_loss == "topk" and a.distill_topk > cfg.model.vocab_size:
        problems.append(f"algorithm.distill_topk={a.distill_topk} exceeds model.vocab_size={cfg.model.vocab_size}")
    if not 0.0 <= a.lam0 <= 1.0:
        problems.append(f"algorithm.lam0={a.lam0} must be in [0, 1]")
    if a.lam_warmup_steps < 0:
        problems.append(f"algorithm.lam_warmup_steps={a.lam_warmup_steps} must be >= 0 (0: no warm-up)")
    # Switches of one method's token advantage, set away from their off value for another method.
    for owner, setting, value in (("rlsd", "negative_only", a.negative_only), ("rlsd", "lam_warmup_steps",
                                  a.lam_warmup_steps), ("opd", "opd_reward_weight", a.opd_reward_weight)):
        if value and method.token_advantage != owner:
            problems.append(f"algorithm.{setting}={value} has no effect with method {a.method} (only {owner} reads "
                            "it); unset it")
    if a.teacher_template is not None:
        problems += _teacher_template_problems(a)
    if a.teacher_model and not method.separate_teacher:
        owners = " / ".join(name.upper() for name in separate)
        problems.append(f"algorithm.teacher_model={a.teacher_model!r} is {owners}'s separate teacher and method "
                        f"{a.method} does not read it; unset it or use method {' or '.join(separate)}")
    if cfg.train.student_log_probs_in_update:
        updates = cfg.train.ppo_epochs * cfg.train.optimizer_steps_per_batch
        if updates != 1:
            problems.append(
                f"train.student_log_probs_in_update=true takes the ratio's old log-probs from the update's own forward, "
                f"which equals the rollout policy only for the first of ppo_epochs x optimizer_steps_per_batch = {updates} "
                "updates: set both to 1 or student_log_probs_in_update=false")
        if cfg.rollout.max_logprob_mismatch is not None:
            problems.append(
                f"rollout.max_logprob_mismatch={cfg.rollout.max_logprob_mismatch} is checked before the update on the "
                "student's scored log-probs, which train.student_log_probs_in_update=true does not compute (the "
                "mismatch is still logged, from the update's forward): unset one of them")
    if a.kl_coef < 0:
        problems.append(f"algorithm.kl_coef={a.kl_coef} must be >= 0 (0: no KL term; textbook GRPO uses 0.04)")
    if a.kl_reference and not a.kl_coef:
        problems.append(f"algorithm.kl_reference={a.kl_reference!r} is the KL term's reference, but "
                        "algorithm.kl_coef=0 turns the term off; set kl_coef > 0 (e.g. 0.04) or unset kl_reference")
    return problems


def _teacher_template_problems(a: AlgorithmConfig) -> list[str]:
    from rlsd_megatron.algorithms.methods import METHODS
    from rlsd_megatron.data.teacher_context import check_teacher_template

    hinted = [m.name for m in METHODS.values() if m.teacher_context == "hinted"]  # a teacher shown the hint (spec §2)
    if a.method not in hinted:
        return [f"algorithm.teacher_template has no effect with method {a.method} (only "
                f"{', '.join(hinted)} show a teacher the dataset hint; SDPO's teacher has its own "
                "template); unset it"]
    try:
        check_teacher_template(a.teacher_template, "algorithm.teacher_template")
    except ValueError as exc:
        return [str(exc)]
    return []


def hardware_problems(cfg: Config, *, cuda_available: bool, te_available: bool) -> list[str]:
    """Precision and kernel choices that this machine cannot run."""
    problems = []
    prec = cfg.precision
    impl = resolve_transformer_impl(cfg, cuda_available=cuda_available, te_available=te_available)
    if impl == "transformer_engine" and not (cuda_available and te_available):
        problems.append(
            "precision.transformer_impl=transformer_engine needs a CUDA GPU and Transformer Engine "
            f"(cuda available: {cuda_available}, TE importable: {te_available}); install .[gpu] on a GPU "
            "machine or use precision.transformer_impl=local"
        )
    if prec.fp8 != "none" and impl != "transformer_engine":
        problems.append(
            f"precision.fp8={prec.fp8} needs Transformer Engine layers on a GPU (resolved transformer_impl="
            f"{impl}); set precision.fp8=none on CPU"
        )
    if prec.fp8 != "none" and prec.params_dtype == "fp32":
        problems.append("precision.fp8 needs precision.params_dtype=bf16 (FP8 GEMMs with bf16 master compute)")
    if cfg.parallel.cp > 1 and impl != "transformer_engine":
        problems.append(
            f"parallel.cp={cfg.parallel.cp} needs Transformer Engine attention on GPUs (megatron-core's "
            "context-parallel attention is TE-only); use parallel.cp=1 here"
        )
    return problems + recompute_problems(cfg)


def recompute_problems(cfg: Config) -> list[str]:
    """Activation recomputation settings megatron-core's TransformerConfig would refuse at model build
    (a bare ValueError), or ignore: recompute_method / recompute_num_layers apply to full recomputation only."""
    prec = cfg.precision
    if prec.recompute_granularity != "full":
        if prec.recompute_method is None and prec.recompute_num_layers is None:
            return []
        return [f"precision.recompute_method={prec.recompute_method} / recompute_num_layers={prec.recompute_num_layers} "
                f"apply to recompute_granularity=full only (got {prec.recompute_granularity}); unset them"]
    if prec.recompute_method is None or prec.recompute_num_layers is None:
        return ["precision.recompute_granularity=full needs precision.recompute_method (uniform or block) and "
                f"precision.recompute_num_layers (got {prec.recompute_method} and {prec.recompute_num_layers})"]
    if prec.recompute_num_layers < 1:  # uniform would loop forever on 0 (groups of 0 layers)
        return [f"precision.recompute_num_layers={prec.recompute_num_layers} must be >= 1 (uniform: layers per "
                "recomputed group; block: recomputed layers per pipeline stage)"]
    return []


def engine_ranks(cfg: Config) -> int:
    """How many of the job's ranks host separate rollout engines (0 when colocated)."""
    return cfg.rollout.engine_ranks if cfg.rollout.placement == "separate" else 0


def placement_problems(cfg: Config, world_size: int) -> list[str]:
    """`rollout.placement` / `rollout.engine_ranks` against the world, and what `separate` refuses for now."""
    r, problems = cfg.rollout, off_policy_problems(cfg)
    if r.placement == "colocated":
        if r.engine_ranks:
            problems.append(f"rollout.engine_ranks={r.engine_ranks} with rollout.placement=colocated: engines then live "
                            "on the learner's ranks; set rollout.placement=separate or rollout.engine_ranks=0")
        return problems
    if not 1 <= r.engine_ranks < world_size:
        problems.append(f"rollout.placement=separate needs 1 <= rollout.engine_ranks < the world size ({world_size}), "
                        f"got {r.engine_ranks}: the job's last engine_ranks ranks host the engines, the rest train")
    else:
        model_parallel = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
        replicas = (world_size - r.engine_ranks) // model_parallel
        if 1 <= replicas < r.engine_ranks:  # (a layout that does not divide is reported by layout_problems)
            problems.append(f"rollout.engine_ranks={r.engine_ranks} with {replicas} data-parallel replica(s): each "
                            "replica sends its whole batch to one engine rank (rollout/separate.py), so "
                            f"{r.engine_ranks - replicas} engine(s) would get no requests; set rollout.engine_ranks <= "
                            f"{replicas} or train with more replicas")
    if r.engine_tp != 1:
        problems.append(f"rollout.engine_tp={r.engine_tp} with rollout.placement=separate: for now each engine rank "
                        "hosts a one-GPU engine; set rollout.engine_tp=1 and raise rollout.engine_ranks instead")
    if r.fp8_weights:
        problems.append("rollout.fp8_weights=true is not supported with rollout.placement=separate yet; "
                        "set rollout.fp8_weights=false or rollout.placement=colocated")
    if cfg.train.offload != "none":
        problems.append(f"train.offload={cfg.train.offload} with rollout.placement=separate: the engines have GPUs "
                        "of their own, so moving the learner off its GPUs makes room for nothing; set train.offload=none")
    return problems


def off_policy_problems(cfg: Config) -> list[str]:
    """`train.off_policy_steps` against the placement and the features it does not combine with yet."""
    steps, problems = cfg.train.off_policy_steps, []
    if steps not in (0, 1):
        return [f"train.off_policy_steps={steps}; expected 0 (synchronous) or 1 (one-step-off-policy)"]
    if not steps:
        return problems
    if cfg.rollout.placement != "separate":
        problems.append("train.off_policy_steps=1 needs rollout.placement=separate: a colocated engine shares the "
                        "learner's GPUs and cannot generate while it trains; set rollout.placement=separate and "
                        "rollout.engine_ranks")
    if cfg.algorithm.dynamic_sampling:
        problems.append("train.off_policy_steps=1 with algorithm.dynamic_sampling=true is not supported yet (refill "
                        "rounds would wait on the engine); set one of them off")
    if cfg.rollout.max_logprob_mismatch is not None:
        problems.append("train.off_policy_steps=1 with rollout.max_logprob_mismatch: the learner is one update ahead "
                        "of the weights that sampled the batch, so the mismatch includes that update and is no check "
                        "of the weight path; unset rollout.max_logprob_mismatch")
    if cfg.train.student_log_probs_in_update:
        problems.append("train.off_policy_steps=1 with train.student_log_probs_in_update=true: the update's forward "
                        "gives the current policy's log-probs, not those of the weights one step older that sampled "
                        "the batch; set train.student_log_probs_in_update=false")
    return problems


def rollout_problems(cfg: Config, *, cuda_available: bool) -> list[str]:
    """Rollout settings the engine this machine would get cannot honour."""
    rollout, problems = cfg.rollout, []
    if rollout.top_k == 1 and rollout.temperature != 1.0:
        # SGLang 0.5.23 treats top_k <= 1 as greedy (sampling_batch_info.py) and then returns the
        # untempered log_softmax(z) (sampler.py), while the learner scores log_softmax(z / T): the
        # mismatch monitor and importance weights would be off by the temperature. Validation uses no
        # engine log-probs (its greedy samples are the same at any T), so val_top_k=1 is fine.
        problems.append(
            f"rollout.top_k=1 samples greedily, and SGLang then reports untempered log-probs while the learner "
            f"uses rollout.temperature={rollout.temperature}; set rollout.temperature=1.0 (the same greedy "
            "rollouts, consistent log-probs) or rollout.top_k=-1 (or >= 2) to sample at that temperature"
        )
    embedded = rollout.backend == "embedded" or (rollout.backend == "auto" and not cuda_available)
    if rollout.fp8_weights and embedded:
        problems.append(
            "rollout.fp8_weights=true needs the SGLang backend on a GPU: the embedded engine (rollout.backend="
            f"{rollout.backend}, cuda available: {cuda_available}) computes in fp32/bf16 and has no FP8 layers; "
            "set rollout.fp8_weights=false"
        )
    if cfg.model.vision is not None and rollout.fp8_weights:
        problems.append(
            "rollout.fp8_weights=true with a vision-language policy (model.vision): which of the vision tower's "
            "layers SGLang's FP8 engine quantises is not checked against what the weight sync pushes; set "
            "rollout.fp8_weights=false"
        )
    replica_gpus = cfg.parallel.tp * cfg.parallel.cp  # one replica's ranks of its first pipeline stage
    if not embedded and rollout.placement == "colocated" and rollout.engine_tp > replica_gpus:
        problems.append(
            f"rollout.engine_tp={rollout.engine_tp} exceeds the GPUs of one model replica's first pipeline stage "
            f"(parallel.tp x parallel.cp = {replica_gpus}), where its engine lives: neighbouring replicas' engines "
            f"would share GPUs; use rollout.engine_tp <= {replica_gpus}"
        )
    if rollout.fp8_weights and cfg.precision.params_dtype != "bf16":
        problems.append(
            f"rollout.fp8_weights=true needs precision.params_dtype=bf16 (got {cfg.precision.params_dtype}): the "
            "engine runs in the params dtype and SGLang's FP8 layers take bf16 or fp16 activations only"
        )
    return problems


def warm_start_problems(cfg: Config) -> list[str]:
    """The supervised warm start stops on greedy accuracy over the validation rows: it needs some."""
    if cfg.warm_start.max_steps and cfg.data.task is None and not cfg.data.val_files:
        # Without any its first accuracy check died in the learner (max() of no micro-batches).
        return [f"warm_start.max_steps={cfg.warm_start.max_steps} measures greedy accuracy on the validation rows to "
                "know when to stop, but there are none: set data.val_files, or warm_start.max_steps=0"]
    return []


def routing_replay_problems(cfg: Config) -> list[str]:
    """What routing replay (`rollout.routing_replay`, learner/routing_replay.py) cannot run with."""
    rollout, prec = cfg.rollout, cfg.precision
    if not rollout.routing_replay:
        return []
    problems = []
    if not cfg.model.num_experts:
        problems.append("rollout.routing_replay=true needs an MoE policy (model.num_experts, family qwen3_moe or qwen2_moe): a "
                        "dense model has no routing to replay; set rollout.routing_replay=false")
    if prec.fp8 != "none" and prec.recompute_granularity == "full":
        # Under FP8 megatron-core recomputes layers with Transformer Engine's checkpoint, which does not
        # raise megatron's is_checkpointing() flag: a recomputed router could not tell that it must
        # replay its micro-batch's recorded experts rather than the latest micro-batch's.
        problems.append(f"rollout.routing_replay=true with precision.fp8={prec.fp8} and precision.recompute_granularity"
                        "=full: the recomputation (Transformer Engine's checkpoint under FP8) cannot be told apart "
                        "from a forward, so it would replay another micro-batch's experts; use recompute_granularity="
                        "selective or none, or precision.fp8=none")
    if rollout.sglang_server_args.get("enable_return_routed_experts") is False:
        problems.append("rollout.routing_replay=true needs SGLang's routed experts, but rollout.sglang_server_args sets "
                        "enable_return_routed_experts=false; drop that override")
    return problems


def validate_config(cfg: Config, world_size: int, *, cuda_available: bool | None = None,
                    te_available: bool | None = None) -> None:
    """Raise one ConfigError listing every layout, batch, hardware and rollout problem of `cfg`
    (values out of range alone when there are any: the other checks compute with them)."""
    import torch

    from rlsd_megatron.config_values import value_problems

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if te_available is None:
        te_available = cuda_available and transformer_engine_available()
    learners = world_size - engine_ranks(cfg) if 1 <= engine_ranks(cfg) < world_size else world_size
    problems = value_problems(cfg) or (
        placement_problems(cfg, world_size) + layout_problems(cfg, learners) + algorithm_problems(cfg)
        + hardware_problems(cfg, cuda_available=cuda_available, te_available=te_available)
        + rollout_problems(cfg, cuda_available=cuda_available) + routing_replay_problems(cfg) + warm_start_problems(cfg))
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
