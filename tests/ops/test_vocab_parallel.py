"""Every vocab-parallel op against a plain-torch reference on the gathered vocabulary, at TP = 1, 2, 4.

Each rank builds the same full logits from a seed, keeps its shard, runs the op over real gloo
process groups, and compares values and its shard's gradients with the reference computed on
the full tensor (fp32/fp64: 1e-5 relative; bf16 inputs: looser on the bf16 gradients). Cases
cover temperature ≠ 1, padded vocabularies (including a rank whose shard is all padding at
TP = 4), bf16, packed [T] and [B, T] inputs (also non-contiguous [B, T] views of [T, B] storage),
chunk sizes that do not divide the token count,
the explicit-group and Megatron-group paths, and check that the caller's logits are bit-identical
afterwards. All cases of one world size run in one `pool.run` to keep the suite fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from rlsd_megatron import ops
from tests.ops import reference

V_PADDED = 48  # V_local = 48, 24, 12 at TP = 1, 2, 4


@dataclass(frozen=True)
class Case:
    op: str
    lead: tuple = (11,)
    dtype: torch.dtype = torch.float32
    temperature: float = 1.0
    vocab_size: int = V_PADDED
    chunk: int | None = None
    explicit_group: bool = False
    transposed: bool = False  # [B, T, V] as a transpose of a contiguous [T, B, V] (Megatron's layout)
    beta: float = 0.5
    k: int = 5
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        extra = f" beta={self.beta}" if self.op == "jsd" else f" {self.options}" if self.options else ""
        return (f"{self.op}{extra} lead={self.lead} {str(self.dtype)[6:]} tau={self.temperature} "
                f"vocab={self.vocab_size} chunk={self.chunk} group={'explicit' if self.explicit_group else 'mcore'}"
                f"{' transposed' if self.transposed else ''}")


_CONFIGS = [
    dict(),
    dict(lead=(2, 5), temperature=0.7, vocab_size=37, chunk=3),
    dict(dtype=torch.bfloat16, temperature=1.3, vocab_size=30, chunk=4),
    dict(lead=(3, 4), temperature=0.7, vocab_size=30, chunk=5, explicit_group=True),
    dict(lead=(3, 4), dtype=torch.bfloat16, vocab_size=37, chunk=5, transposed=True),
]
_OPS = [
    dict(op="log_prob"),
    dict(op="log_prob_entropy"),
    dict(op="at_ids"),
    dict(op="kl"),
    dict(op="jsd", beta=0.5),
    dict(op="jsd", beta=0.3),
    dict(op="jsd", beta=0.0),
    dict(op="jsd", beta=1.0),
    dict(op="topk"),
    dict(op="distill"),
    dict(op="distill", options=dict(support="student", divergence="jsd", beta=0.5, tail_bucket=True)),
    dict(op="distill", options=dict(support="teacher", divergence="jsd", beta=0.3, tail_bucket=True)),
    dict(op="distill", options=dict(support="student", divergence="kl")),
]
CASES = [Case(**{**cfg, **op}) for cfg in _CONFIGS for op in _OPS]


def _full_inputs(case: Case, seed: int):
    """Two full-vocabulary logit tensors, target ids and k ids per token (same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*case.lead, V_PADDED)
    if case.op in ("topk", "distill"):
        # distinct multiples of 1/8 (exact in bf16) so the top-k is unambiguous in every dtype
        logits = [(torch.rand(shape, generator=gen).argsort(-1) - V_PADDED / 2) / 8 for _ in range(2)]
    else:
        logits = [2 * torch.randn(shape, generator=gen) for _ in range(2)]
    target = torch.randint(0, case.vocab_size, case.lead, generator=gen)
    ids = torch.randint(0, case.vocab_size, (*case.lead, case.k), generator=gen)
    ids[..., -1] = ids[..., 0]  # a repeated id
    return [z.to(case.dtype) for z in logits], target, ids


def _ours(case: Case, logits, target, ids, group):
    kw = dict(temperature=case.temperature, vocab_size=case.vocab_size, chunk_size=case.chunk, group=group)
    if case.op == "log_prob":
        return (ops.token_log_probs(logits[0], target, **kw),)
    if case.op == "log_prob_entropy":
        return ops.token_log_probs(logits[0], target, return_entropy=True, **kw)
    if case.op == "at_ids":
        return (ops.log_probs_at_ids(logits[0], ids, **kw),)
    if case.op == "kl":
        return (ops.kl_divergence(logits[0], logits[1], **kw),)
    if case.op == "jsd":
        return (ops.generalized_jsd(logits[0], logits[1], beta=case.beta, **kw),)
    if case.op == "topk":
        return ops.vocab_topk(logits[0], case.k, group=group, vocab_size=case.vocab_size)
    return (ops.topk_distillation_loss(logits[0], logits[1], case.k, **kw, **case.options),)


def _reference(case: Case, logits, target, ids):
    tau, vocab = case.temperature, case.vocab_size
    if case.op == "log_prob":
        return (reference.token_log_probs(logits[0], target, tau, vocab)[0],)
    if case.op == "log_prob_entropy":
        return reference.token_log_probs(logits[0], target, tau, vocab)
    if case.op == "at_ids":
        return (reference.log_probs_at_ids(logits[0], ids, tau, vocab),)
    if case.op == "kl":
        return (reference.kl_divergence(logits[0], logits[1], tau, vocab),)
    if case.op == "jsd":
        return (reference.generalized_jsd(logits[0], logits[1], case.beta, tau, vocab),)
    if case.op == "topk":
        return tuple(reference.vocab_topk(logits[0], case.k, vocab))
    options = {"support": "teacher", "divergence": "kl", "beta": 0.5, "tail_bucket": False, **case.options}
    return (reference.topk_distillation_loss(logits[0], logits[1], case.k, tau, vocab, **options),)


def _mismatch(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float,
              scale: float | None = None) -> str | None:
    """None if |got − want| ≤ rtol·(|want| + scale), else a message. ``scale`` is the magnitude of
    the whole tensor (default max|want|; for a gradient shard, that of the full-vocabulary gradient)."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs()
    bound = rtol * (want.abs() + scale) + 1e-30
    if bool((err <= bound).all()):
        return None
    return f"{name}: max abs err {err.max().item():.3g}, max |ref| {scale:.3g}, rtol {rtol}"


def _check_case(case: Case, seed: int, rank: int, world: int, group) -> list[str]:
    full, target, ids = _full_inputs(case, seed)
    local = full[0].shape[-1] // world
    cols = slice(rank * local, (rank + 1) * local)
    if case.transposed:
        shards = [z[..., cols].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True) for z in full]
    else:
        shards = [z[..., cols].clone().requires_grad_(True) for z in full]
    before = [s.detach().clone() for s in shards]
    refs_in = [z.clone().requires_grad_(True) for z in full]

    ours = _ours(case, shards, target, ids, group)
    want = _reference(case, refs_in, target, ids)
    value_rtol = 1e-5 if case.dtype != torch.bfloat16 else 1e-4
    grad_rtol = 1e-5 if case.dtype != torch.bfloat16 else 1e-2
    problems = []
    if case.op == "topk":
        if not torch.equal(ours[1], want[1]):
            problems.append("topk ids differ")
        ours, want = ours[:1], want[:1]
    for i, (got, ref) in enumerate(zip(ours, want)):
        problems.append(_mismatch(f"output {i}", got, ref, value_rtol))
    gen = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(ref.shape, generator=gen, dtype=torch.float64) for ref in want]
    sum(((got.double() * w).sum() for got, w in zip(ours, weights))).backward()
    sum(((ref.double() * w).sum() for ref, w in zip(want, weights))).backward()
    for i, (shard, ref_in) in enumerate(zip(shards, refs_in)):
        if ref_in.grad is None:
            continue
        got = shard.grad if shard.grad is not None else torch.zeros_like(shard)
        scale = ref_in.grad.abs().max().item()
        problems.append(_mismatch(f"grad {i}", got.float(), ref_in.grad[..., cols].float(), grad_rtol, scale))
        if got.dtype != shard.dtype:
            problems.append(f"grad {i} dtype {got.dtype} != logits dtype {shard.dtype}")
    for i, (shard, orig) in enumerate(zip(shards, before)):
        if not torch.equal(shard.detach(), orig):
            problems.append(f"logits {i} were modified")
    return [f"TP={world} rank {rank} [{case.name}] {p}" for p in problems if p]


def check_cases(tp: int) -> list[str]:
    """Run every case at tensor-parallel size ``tp`` (1 in a plain process without Megatron)."""
    import torch.distributed as dist

    if tp == 1 and not dist.is_initialized():
        return [p for seed, case in enumerate(CASES) for p in _check_case(case, seed, 0, 1, None)]
    from megatron.core import parallel_state

    from rlsd_megatron.parallel.state import model_parallel

    problems = []
    with model_parallel(tp=tp):
        tp_group = parallel_state.get_tensor_model_parallel_group()
        rank = parallel_state.get_tensor_model_parallel_rank()
        for seed, case in enumerate(CASES):
            problems += _check_case(case, seed, rank, tp, tp_group if case.explicit_group else None)
    return problems


def check_megatron_cross_entropy(tp: int) -> list[str]:
    """−token_log_probs equals megatron-core's vocab_parallel_cross_entropy (values and grads)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from rlsd_megatron.parallel.state import model_parallel

    problems = []
    with model_parallel(tp=tp):
        rank = parallel_state.get_tensor_model_parallel_rank()
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(7)
            full = (3 * torch.randn(6, 2, V_PADDED, generator=gen)).to(dtype)  # Megatron's [S, B, V]
            target = torch.randint(0, V_PADDED, (6, 2), generator=gen)
            local = V_PADDED // tp
            shard = full[..., rank * local:(rank + 1) * local].contiguous()
            ours_in = shard.clone().requires_grad_(True)
            mcore_in = shard.clone().requires_grad_(True)
            ours = -ops.token_log_probs(ours_in, target, chunk_size=5)
            # Megatron's cross-entropy works in place on fp32 input: give it its own copy
            mcore = vocab_parallel_cross_entropy(mcore_in.clone(), target)
            weight = torch.randn(6, 2, generator=gen)
            (ours * weight).sum().backward()
            (mcore * weight).sum().backward()
            rtol = 1e-5 if dtype == torch.float32 else 1e-2
            scale = 1.0  # |∂(−log p)/∂z| ≤ 1 over the full vocabulary
            for name, got, want in (("loss", ours, mcore), ("grad", ours_in.grad.float(), mcore_in.grad.float())):
                msg = _mismatch(f"{name} vs megatron ({dtype})", got, want, rtol, scale if name == "grad" else None)
                if msg:
                    problems.append(f"TP={tp} rank {rank}: {msg}")
    return problems


def _flatten(per_rank: list[list[str]]) -> list[str]:
    return [p for problems in per_rank for p in problems]


def test_tp1_plain_process_matches_reference():
    problems = check_cases(1)
    assert not problems, "\n".join(problems)


# Module-scoped and parametrized, so pytest runs every test of one world size before the next
# (one pool start per size).
@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def world(request, dist_pool):
    return request.param, dist_pool(request.param)


def _tps(world_size: int) -> tuple[int, ...]:
    return (1, 2) if world_size == 2 else (world_size,)  # TP=1 under Megatron runs as DP=2


def test_matches_full_vocab_reference(world):
    size, pool = world
    runs = [pool.run(check_cases, tp, timeout=900) for tp in _tps(size)]  # generous: the box is shared
    problems = [p for per_rank in runs for p in _flatten(per_rank)]
    assert not problems, "\n".join(problems)


def test_matches_megatron_cross_entropy(world):
    size, pool = world
    runs = [pool.run(check_megatron_cross_entropy, tp, timeout=900) for tp in _tps(size)]
    problems = [p for per_rank in runs for p in _flatten(per_rank)]
    assert not problems, "\n".join(problems)
