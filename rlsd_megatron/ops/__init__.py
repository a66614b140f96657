"""Vocab-parallel math: log-probs, entropy, KL / JSD and top-k over tensor-parallel vocabulary shards.

Every op takes this rank's ``[..., V_local]`` slice of the logits (rank r of the tensor-parallel
group owns vocabulary ids ``[r·V_local, (r+1)·V_local)``), never gathers the vocabulary, works on
token chunks with a bounded fp32 workspace, leaves the caller's logits untouched, and has an exact,
chunk-recomputing backward. Math: spec §8 (``shared/spec/rlsd.md``).
"""

from rlsd_megatron.ops.divergences import generalized_jsd, kl_divergence
from rlsd_megatron.ops.log_probs import log_probs_at_ids, token_log_probs
from rlsd_megatron.ops.topk import append_tail_bucket, topk_distillation_loss, vocab_topk

__all__ = [
    "append_tail_bucket",
    "generalized_jsd",
    "kl_divergence",
    "log_probs_at_ids",
    "token_log_probs",
    "topk_distillation_loss",
    "vocab_topk",
]
