"""The fused output layer (ops/fused_output.py) against today's path (output layer, then
`token_log_probs`): same values and gradients (float64: 1e-10), no [tokens, V] tensor kept for the
backward, and at TP = 2 the same against plain torch on the full vocabulary (float64, 1e-9)."""

import torch

from rlsd_megatron import ops
from rlsd_megatron.ops.fused_output import fused_token_log_probs

T, H, V, CHUNK = 37, 16, 96, 8


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5
    targets = torch.randint(0, V, (T,), generator=gen)
    coef = torch.randn(2, T, generator=gen, dtype=torch.float64)
    return hidden, weight, targets, coef


def _unfused(hidden, weight, targets, group=None):
    log_p, entropy = ops.token_log_probs(hidden @ weight.t(), targets, return_entropy=True, group=group, chunk_size=5)
    return {"log_p": log_p, "entropy": entropy}


def _fused(hidden, weight, targets, group=None):
    log_p, entropy = fused_token_log_probs(hidden, weight, targets, return_entropy=True, group=group,
                                           chunk_tokens=CHUNK)
    return {"log_p": log_p, "entropy": entropy}


def _grads(hidden, weight, values, coef):
    loss = (coef[0] * values["log_p"]).sum() + (coef[1] * values["entropy"]).sum()
    return torch.autograd.grad(loss, (hidden, weight))


def _largest_saved(run):
    """numel of the largest tensor autograd saves for the backward while `run` builds the graph."""
    sizes = [0]

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, max(sizes)


def test_values_and_gradients_equal_the_unfused_path_and_no_logits_are_kept():
    hidden, weight, targets, coef = _inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused, fused_saved = _largest_saved(lambda: _fused(h1, w1, targets))
    unfused, unfused_saved = _largest_saved(lambda: _unfused(h2, w2, targets))
    for name in ("log_p", "entropy"):
        torch.testing.assert_close(fused[name], unfused[name], rtol=0, atol=1e-10)
    for got, want in zip(_grads(h1, w1, fused, coef), _grads(h2, w2, unfused, coef)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert unfused_saved >= T * V  # today's path keeps the micro-batch's logits
    assert fused_saved <= max(T * H, V * H)  # the fused one only its inputs: logits are recomputed


def test_no_grad_and_empty_inputs():
    hidden, weight, targets, _ = _inputs()
    with torch.no_grad():
        values = _fused(hidden, weight, targets)
    torch.testing.assert_close(values["log_p"], _unfused(hidden, weight, targets)["log_p"], rtol=0, atol=1e-10)
    assert _fused(hidden[:0], weight, targets[:0])["log_p"].shape == (0,)
    log_p_only = fused_token_log_probs(hidden.requires_grad_(), weight, targets, chunk_tokens=CHUNK)
    log_p_only.sum().backward()  # entropy not asked for: no gradient path through it
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def _tensor_parallel_case():
    """Each TP rank holds its rows of the output weight; compared with plain torch on the full one."""
    from megatron.core import parallel_state

    from rlsd_megatron.ops.fused_output import output_layer_input
    from rlsd_megatron.parallel.state import model_parallel

    problems = []
    with model_parallel(tp=2):
        rank, tp = parallel_state.get_tensor_model_parallel_rank(), 2
        hidden, weight, targets, coef = _inputs(seed=3)
        rows = slice(rank * V // tp, (rank + 1) * V // tp)
        h = hidden.clone().requires_grad_()
        w = weight[rows].clone().requires_grad_()
        values = _fused(output_layer_input(h), w, targets)
        got_h, got_w = _grads(h, w, values, coef)
        # Reference: the full vocabulary in one process, plain torch.
        h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        log_softmax = torch.log_softmax(h_ref @ w_ref.t(), dim=-1)
        ref = {"log_p": log_softmax.gather(1, targets[:, None]).squeeze(1),
               "entropy": -(log_softmax.exp() * log_softmax).sum(-1)}
        want_h, want_w = _grads(h_ref, w_ref, ref, coef)
        for name, got, want in (("log_p", values["log_p"], ref["log_p"]), ("entropy", values["entropy"], ref["entropy"]),
                                ("d hidden", got_h, want_h), ("d weight", got_w, want_w[rows])):
            error = (got - want).abs().max().item()
            if error > 1e-9:
                problems.append(f"rank {rank} {name}: max error {error:.3g}")
    return problems


def test_tensor_parallel_matches_the_full_vocabulary(dist_pool):
    problems = [p for rank_problems in dist_pool(2).run(_tensor_parallel_case) for p in rank_problems]
    assert not problems, problems
