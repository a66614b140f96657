"""Finite-difference gradient checks (float64, TP = 1) of every op, incl. entropy and both logits arguments."""

from __future__ import annotations

import pytest
import torch

from rlsd_megatron import ops

T, V, VOCAB, TAU, CHUNK = 5, 12, 10, 0.8, 2  # 2 padded ids; chunks of 2 over 5 tokens


def _logits(seed: int, distinct: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if distinct:  # well-separated values: the top-k support does not move under the perturbation
        z = (torch.rand(T, V, generator=gen).argsort(-1) - V / 2).double() / 3
    else:
        z = torch.randn(T, V, generator=gen, dtype=torch.float64)
    return z.requires_grad_(True)


KW = dict(temperature=TAU, vocab_size=VOCAB, chunk_size=CHUNK)
TARGET = torch.tensor([0, 3, 9, 9, 4])
IDS = torch.tensor([[0, 1, 9], [2, 2, 5], [9, 8, 7], [3, 0, 3], [6, 4, 1]])

CASES = {
    "log_prob+entropy": (1, lambda z: ops.token_log_probs(z, TARGET, return_entropy=True, **KW)),
    "log_prob": (1, lambda z: ops.token_log_probs(z, TARGET, **KW)),
    "log_probs_at_ids": (1, lambda z: ops.log_probs_at_ids(z, IDS, **KW)),
    "kl": (2, lambda p, q: ops.kl_divergence(p, q, **KW)),
    "jsd_0.3": (2, lambda s, t: ops.generalized_jsd(s, t, beta=0.3, **KW)),
    "jsd_0": (2, lambda s, t: ops.generalized_jsd(s, t, beta=0.0, **KW)),
    "topk_values": (1, lambda z: ops.vocab_topk(z, 3, vocab_size=VOCAB)[0]),
    "distill_default": (2, lambda s, t: ops.topk_distillation_loss(s, t, 3, **KW)),
    "distill_sdpo": (2, lambda s, t: ops.topk_distillation_loss(
        s, t, 3, support="student", divergence="jsd", beta=0.5, tail_bucket=True, **KW)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_float64(name):
    n_args, fn = CASES[name]
    distinct = name.startswith(("topk", "distill"))
    args = [_logits(seed, distinct) for seed in range(n_args)]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)
