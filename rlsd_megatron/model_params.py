"""Parameter counts of a configuration's model, whole and per GPU under its parallel layout, from
the family's HF tensor shapes (and transformers' own vision tower): what the memory planner
(`plan.py`) counts and its model description prints."""

from __future__ import annotations

import math

from rlsd_megatron.config import Config
from rlsd_megatron.models.families import family_of
from rlsd_megatron.models.provider import padded_vocab_size


def layer_params(cfg: Config, *, experts: bool | None = None) -> int:
    """Parameters of one decoder layer: the HF shapes of the family's per-layer tensor rules
    (`experts`: only the MoE experts' (True), only the rest (False), all (None))."""
    rules = family_of(cfg.model).tensor_rules(cfg.model)
    return sum(math.prod(shape) for rule in rules if "{i}" in rule.megatron
               and experts in (None, ".mlp.experts." in rule.megatron) for shape in rule.hf_shapes)


def stage_params(cfg: Config, *, first: bool, last: bool) -> int:
    """Parameters held by one GPU of a pipeline stage (TP-split tensors divided by TP, experts by
    TP x EP)."""
    m, p = cfg.model, cfg.parallel
    vocab_rows = padded_vocab_size(m, p.tp) // p.tp
    layers = m.num_layers // p.pp
    # TP splits every layer; an MoE layer's experts are spread over parallel.ep ranks as well.
    count = layers * (layer_params(cfg, experts=False) + layer_params(cfg, experts=True) // p.ep) // p.tp
    if first:
        count += vocab_rows * m.hidden_size + vision_params(cfg)  # the tower: first stage, replicated over TP
    if last:
        count += m.hidden_size  # final norm
        if not m.tie_word_embeddings or p.pp > 1:
            count += vocab_rows * m.hidden_size
    return count


def vision_params(cfg: Config) -> int:
    """Parameters of the vision tower (0 for a text model): transformers' own tower, on the meta device."""
    if cfg.model.vision is None:
        return 0
    from rlsd_megatron.models.vision_config import vision_tensor_shapes

    return sum(math.prod(shape) for shape in vision_tensor_shapes(cfg.model).values())


def gpu_expert_params(cfg: Config) -> int:
    """Expert parameters on one GPU (every stage holds its layers' experts: the same on each)."""
    m, p = cfg.model, cfg.parallel
    if not m.num_experts:
        return 0
    return m.num_layers // p.pp * layer_params(cfg, experts=True) // (p.ep * p.tp)


def gpu_params(cfg: Config) -> int:
    """Parameters on one GPU of the most loaded pipeline stage (the first or the last)."""
    pp = cfg.parallel.pp
    return max(stage_params(cfg, first=True, last=pp == 1), stage_params(cfg, first=pp == 1, last=True))


def total_params(cfg: Config) -> int:
    """Parameters of the whole model (unpadded vocabulary: the count model cards publish)."""
    m = cfg.model
    embedding = m.vocab_size * m.hidden_size
    return (m.num_layers * layer_params(cfg) + embedding + m.hidden_size + (0 if m.tie_word_embeddings else embedding)
            + vision_params(cfg))
