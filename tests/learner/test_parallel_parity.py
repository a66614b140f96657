"""Learner parity: TP=2, PP=2, DP=2, TP=2×PP=2 and the interleaved PP=4×VPP=2 against a
single-process TP=1/PP=1 reference.

Same canonical weights, same batch of variable-length sequences: logits, loss, every gradient
and the weights after one AdamW step must match the single-process run within 1e-5 (fp32,
absolute on values of order 1; gradients compared relative to their largest entry).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rlsd_megatron.config import Config, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig

TOL = 1e-5

MODELS = {
    # GQA (4 query heads, 2 KV groups), untied embeddings, Llama style.
    "llama_gqa": dict(family="llama", vocab_size=100, hidden_size=32, num_layers=4, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=64, tie_word_embeddings=False),
    # Tied embeddings with q/k RMSNorm and an explicit head dim (Qwen3 style).
    "qwen3_tied": dict(family="qwen3", vocab_size=90, hidden_size=32, num_layers=4, num_attention_heads=4,
                       num_query_groups=2, kv_channels=16, ffn_hidden_size=64, qk_layernorm=True,
                       tie_word_embeddings=True),
    # QKV bias, multi-head attention (Qwen2 style).
    "qwen2_bias": dict(family="qwen2", vocab_size=100, hidden_size=32, num_layers=4, num_attention_heads=4,
                       ffn_hidden_size=64, qkv_bias=True, tie_word_embeddings=True),
}


def make_config(model: str, tp=1, pp=1, distributed_optimizer=False, vpp=None, num_layers=None) -> Config:
    spec = {**MODELS[model], **({"num_layers": num_layers} if num_layers else {})}
    return Config(
        model=ModelConfig(**spec),
        parallel=ParallelConfig(tp=tp, pp=pp, vpp=vpp, use_distributed_optimizer=distributed_optimizer),
        # eps well above the gradients' float32 noise keeps Adam's first step (~lr·sign(g)) a smooth
        # function of g, so layouts that agree on gradients to 1e-6 agree on weights too.
        optimizer=OptimizerConfig(lr=1e-3, adam_eps=1e-4, weight_decay=0.01, clip_grad=1.0),
        train=TrainConfig(steps=10),
    )


def make_sequences(vocab_size: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab_size, (n,), generator=gen) for n in (9, 5, 12, 7)]


def masked_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Padded vocabulary rows → -inf (padding differs between TP sizes)."""
    from megatron.core import parallel_state

    local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * local
    ids = torch.arange(start, start + local)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def nll_loss_fn(vocab_size: int, total_tokens: int):
    """Token-mean NLL over the *global* batch: sum over this micro-batch / total tokens."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def loss_fn(logits, mb):
        nll = vocab_parallel_cross_entropy(masked_logits(logits, vocab_size).float(), mb.targets)
        loss = (nll * mb.target_mask).sum() / total_tokens
        return loss, {"tokens": mb.target_mask.sum()}

    return loss_fn


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)[..., :vocab_size]


def run_case(model: str, tp: int, pp: int, full_state=None, distributed_optimizer=False, vpp=None,
             num_layers=None, micro_batches_per_rank=2) -> dict:
    """Build the learner at (tp, pp, vpp) with dp = world/(tp*pp); load `full_state` (or keep the
    seeded init); return logits, loss, grads and post-step weights as canonical full tensors."""
    from megatron.core import parallel_state

    from rlsd_megatron.learner.batch import padded_micro_batch
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    cfg = make_config(model, tp, pp, distributed_optimizer, vpp, num_layers)
    vocab = cfg.model.vocab_size
    with model_parallel(tp=tp, pp=pp, vpp=vpp):
        learner = Learner(cfg)
        if full_state is not None:
            learner.load_full_state(full_state)
        initial = learner.full_state()
        sequences = make_sequences(vocab)
        total_tokens = sum(len(s) - 1 for s in sequences)
        dp = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        mine = sequences[dp_rank::dp]
        # Several micro-batches per rank so that accumulation is exercised.
        n = micro_batches_per_rank
        micro_batches = [padded_micro_batch(mine[i::n]) for i in range(n)]

        outputs = learner.forward(micro_batches, lambda logits, mb: {"logits": gather_vocab(logits, vocab)})
        logits = None
        if outputs is not None:
            logits = [out["logits"] for out in outputs]
        stats = learner.train_step(micro_batches, nll_loss_fn(vocab, total_tokens))
        # Sum of the data-parallel ranks' shares, counted once per TP group on the last stage.
        counts = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        loss = torch.tensor(stats["loss"] if counts else 0.0, dtype=torch.float64)
        dist.all_reduce(loss)
        grads = learner.full_state(grads=True) if not distributed_optimizer else None
        # Megatron's grad buffers hold the reduced gradient until the next step zeroes them.
        after = learner.full_state()
        per_rank_logits = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank_logits, (dp_rank, logits))
    by_dp = {}
    for rank_dp, rank_logits in per_rank_logits:
        if rank_logits is not None:
            by_dp[rank_dp] = rank_logits
    return {
        "initial": initial,
        "logits": by_dp,
        "loss": float(loss),
        "grads": grads,
        "after": after,
        "grad_norm": stats["grad_norm"],
    }


INTERLEAVED_MODELS = ["llama_gqa", "qwen3_tied"]


def reference_cases() -> dict:
    """The single process: 4-layer models, and 8-layer ones for the interleaved layout ("name@8")."""
    return {**{model: run_case(model, 1, 1) for model in MODELS},
            **{f"{model}@8": run_case(model, 1, 1, num_layers=8, micro_batches_per_rank=4)
               for model in INTERLEAVED_MODELS}}


def layout_cases(references: dict, layouts: list[tuple[int, int, bool]]) -> dict:
    return {
        (model, tp, pp, dopt): run_case(model, tp, pp, full_state=references[model]["initial"], distributed_optimizer=dopt)
        for model in MODELS
        for tp, pp, dopt in layouts
    }


@pytest.fixture(scope="module")
def references(dist_pool):
    return dist_pool(1).run(reference_cases)[0]


def _logits_by_sequence(logits_by_dp: dict, dp: int) -> dict[int, torch.Tensor]:
    """Per original sequence index → its logits rows [L, V] (unpadded)."""
    lengths = (9, 5, 12, 7)
    out = {}
    for dp_rank, micro_logits in logits_by_dp.items():
        mine = list(range(len(lengths)))[dp_rank::dp]
        for m, mb_logits in enumerate(micro_logits):
            for row, seq in enumerate(mine[m::len(micro_logits)]):
                out[seq] = mb_logits[row, : lengths[seq]]
    return out


def assert_matches(case: dict, ref: dict, dp: int, check_grads: bool) -> None:
    got = _logits_by_sequence(case["logits"], dp)
    want = _logits_by_sequence(ref["logits"], 1)
    assert sorted(got) == sorted(want)
    for seq in want:
        torch.testing.assert_close(got[seq], want[seq], rtol=0, atol=TOL)
    assert case["loss"] == pytest.approx(ref["loss"], abs=TOL)
    assert case["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    names = sorted(ref["after"])
    assert sorted(case["after"]) == names
    if check_grads:
        for name in names:
            scale = ref["grads"][name].abs().max().clamp_min(1e-12)
            diff = (case["grads"][name] - ref["grads"][name]).abs().max() / scale
            assert diff < TOL, f"grad {name}: relative diff {diff:.2e}"
    for name in names:
        torch.testing.assert_close(case["after"][name], ref["after"][name], rtol=0, atol=TOL, msg=name)
        assert not torch.equal(ref["after"][name], ref["initial"][name]), f"{name} did not change"


@pytest.mark.parametrize("world", [2, 4])
def test_layouts_match_single_process(dist_pool, references, world):
    layouts = {
        2: [(2, 1, False), (1, 2, False), (1, 1, False), (1, 1, True)],
        4: [(2, 2, False), (2, 1, True)],
    }[world]
    cases = dist_pool(world).run(layout_cases, references, layouts, timeout=600)[0]
    for (model, tp, pp, dopt), case in cases.items():
        dp = world // (tp * pp)
        try:
            assert_matches(case, references[model], dp, check_grads=not dopt)
        except AssertionError as exc:
            raise AssertionError(f"{model} tp={tp} pp={pp} dp={dp} distributed_optimizer={dopt}: {exc}") from exc



def interleaved_cases(full_states: dict) -> dict:
    return {model: run_case(model, 1, 4, full_state=state, vpp=2, num_layers=8, micro_batches_per_rank=4)
            for model, state in full_states.items()}


def test_interleaved_pipeline_matches_single_process(dist_pool, references):
    """PP=4 × VPP=2: 8 layers, two chunks per rank, the embedding and the (tied) output layer on
    different ranks' chunks; micro-batches of different widths, so every p2p exchange sends its
    shape first. Same weights, same checks as every other layout."""
    states = {model: references[f"{model}@8"]["initial"] for model in INTERLEAVED_MODELS}
    cases = dist_pool(4).run(interleaved_cases, states, timeout=600)[0]
    for model, case in cases.items():
        try:
            assert_matches(case, references[f"{model}@8"], 1, check_grads=True)
        except AssertionError as exc:
            raise AssertionError(f"{model} pp=4 vpp=2: {exc}") from exc
