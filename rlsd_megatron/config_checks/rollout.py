"""The rollout side: engine placement (colocated or on their own ranks), one-step-off-policy,
the engine's settings and routing replay."""

from __future__ import annotations

from rlsd_megatron.config import Config


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
