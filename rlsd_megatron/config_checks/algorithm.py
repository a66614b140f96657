"""The method's settings: which fields each method reads, teacher weights and templates, the
supervised warm start, and recipe settings this run's reward or schedule would never read."""

from __future__ import annotations

from rlsd_megatron.config import AlgorithmConfig, Config, OptimizerConfig, RewardConfig


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
    if not method.distills and a.distill_coef != 1.0:
        problems.append(f"algorithm.distill_coef={a.distill_coef} has no effect with method {a.method} (only "
                        f"{', '.join(distilling)} read it); unset it")
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
    problems += _sdpo_demonstration_problems(cfg)
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


def _sdpo_demonstration_problems(cfg: Config) -> list[str]:
    from rlsd_megatron.algorithms.methods import METHODS, get_method

    a = cfg.algorithm
    if get_method(a.method).teacher_context != "sibling":
        if a.sdpo_demonstrations == "first_success":
            return []
        siblings = [m.name for m in METHODS.values() if m.teacher_context == "sibling"]
        return [f"algorithm.sdpo_demonstrations={a.sdpo_demonstrations} has no effect with method {a.method} (only "
                f"{', '.join(siblings)} reads it: its teacher sees sibling rollouts); unset it"]
    problems = []
    if cfg.rollout.n < 2:  # without a sibling no sample has a teacher: no gradient at all
        problems.append(f"algorithm.method={a.method} shows its teacher sibling rollouts of the same prompt: it needs "
                        f"rollout.n >= 2, got {cfg.rollout.n}")
    if a.sdpo_demonstrations == "shortest_correct_and_incorrect" and cfg.data.task is not None:
        problems.append(f"algorithm.sdpo_demonstrations=shortest_correct_and_incorrect puts the RLSD paper's English "
                        f"template (\"Problem: ... Correct solution: ...\") in the teacher's prompt, which the built-in "
                        f"task data.task={cfg.data.task} cannot write in its tokens; use data.train_files with a "
                        "tokenizer, or sdpo_demonstrations=first_success (the task's own SDPO template)")
    return problems


def warm_start_problems(cfg: Config) -> list[str]:
    """The supervised warm start stops on greedy accuracy over the validation rows: it needs some."""
    if cfg.warm_start.max_steps and cfg.data.task is None and not cfg.data.val_files:
        # Without any its first accuracy check died in the learner (max() of no micro-batches).
        return [f"warm_start.max_steps={cfg.warm_start.max_steps} measures greedy accuracy on the validation rows to "
                "know when to stop, but there are none: set data.val_files, or warm_start.max_steps=0"]
    return []


def inert_setting_problems(cfg: Config) -> list[str]:
    """Settings moved off their defaults where this run never reads them: the math reward's weights
    and answer tag under another reward (`rewards/scorer.py`: a custom function or a built-in task;
    `think_tag` is SDPO's too, which strips those spans from demonstrations), the decay's end under
    a constant learning rate."""
    problems = []
    other_reward = (f"reward.custom_fn={cfg.reward.custom_fn}" if cfg.reward.custom_fn
                    else f"data.task={cfg.data.task}" if cfg.data.task else None)
    if other_reward:
        math_only = ("accuracy_weight", "format_weight", "answer_tag")
        moved = [name for name in math_only if getattr(cfg.reward, name) != getattr(RewardConfig(), name)]
        if moved:
            problems.append(f"reward.{', reward.'.join(moved)} only shape the math reward, which {other_reward} "
                            "replaces; unset them")
    if cfg.optimizer.lr_decay_style == "constant" and cfg.optimizer.min_lr != OptimizerConfig().min_lr:
        problems.append(f"optimizer.min_lr={cfg.optimizer.min_lr} is where a decay ends, but "
                        "optimizer.lr_decay_style=constant never decays: set lr_decay_style (linear, cosine) or unset it")
    return problems
