"""The parallel layout against the model and the world size: divisibility, batch splits, the
interleaved schedule, MoE expert parallelism, Qwen3-VL's DeepStack placement."""

from __future__ import annotations

from rlsd_megatron.config import Config


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
    if m.freeze_vision_tower and m.vision is None:
        problems.append("model.freeze_vision_tower=true but the model has no vision tower (model.vision, or model.hf_config "
                        "of a vision-language model); unset it")
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
