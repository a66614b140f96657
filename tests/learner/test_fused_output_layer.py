"""`train.fused_output_layer`: the learner's log-probs, loss and every gradient equal the unfused
path's (output layer, then `token_log_probs`) at TP=2 with tied embeddings and at PP=2 untied,
and the callbacks really got unprojected logits. fp32; 1e-5 on values, gradients 1e-5 relative
to their largest entry (the fused ∂W sums its chunks in another order)."""

from __future__ import annotations

import torch

from tests.learner.test_parallel_parity import TOL, make_config, make_sequences

LAYOUTS = [("qwen3_tied", 2, 1), ("llama_gqa", 1, 2)]


def _run(model: str, tp: int, pp: int, fused: bool, full_state) -> dict:
    from rlsd_megatron.learner.batch import padded_micro_batch
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.ops import token_log_probs
    from rlsd_megatron.parallel.state import model_parallel

    cfg = make_config(model, tp, pp)
    cfg.train.fused_output_layer, cfg.train.fused_output_chunk_tokens = fused, 5
    vocab = cfg.model.vocab_size
    sequences = make_sequences(vocab)
    total = sum(len(s) - 1 for s in sequences)
    seen = set()

    def log_probs(logits, mb):
        seen.add(type(logits).__name__)
        return {"logp": token_log_probs(logits, mb.targets, vocab_size=vocab)}

    def loss_fn(logits, mb):
        seen.add(type(logits).__name__)
        logp, entropy = token_log_probs(logits, mb.targets, vocab_size=vocab, return_entropy=True)
        loss = ((-logp + 0.1 * entropy) * mb.target_mask).sum() / total
        return loss, {}

    with model_parallel(tp=tp, pp=pp):
        learner = Learner(cfg)
        learner.load_full_state(full_state)
        logp = learner.forward_sequences(sequences, log_probs)["logp"]
        stats = learner.train_step([padded_micro_batch(sequences[i::2]) for i in range(2)], loss_fn)
        grads = learner.full_state(grads=True)
    return {"logp": logp, "loss": stats.get("loss"), "grads": grads, "seen": seen}


def _cases():
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    results = {}
    for model, tp, pp in LAYOUTS:
        with model_parallel(seed=5):
            state = Learner(make_config(model)).full_state()
        results[(model, tp, pp)] = {fused: _run(model, tp, pp, fused, state) for fused in (False, True)}
    return results


def test_fused_output_layer_matches_the_output_layer_then_the_op(dist_pool):
    for rank, results in enumerate(dist_pool(2).run(_cases)):
        for layout, runs in results.items():
            plain, fused = runs[False], runs[True]
            if fused["loss"] is not None:  # the last pipeline stage: the callbacks ran here
                assert plain["seen"] == {"Tensor"} and fused["seen"] == {"UnprojectedLogits"}, (layout, fused["seen"])
                torch.testing.assert_close(fused["loss"], plain["loss"], rtol=0, atol=TOL)
            for got, want in zip(fused["logp"], plain["logp"]):
                torch.testing.assert_close(got, want, rtol=0, atol=TOL)
            for name, want in plain["grads"].items():
                scale = want.abs().max().clamp_min(1e-12)
                error = float((fused["grads"][name] - want).abs().max() / scale)
                assert error < TOL, (rank, layout, name, error)
            assert any(g.abs().sum() > 0 for g in fused["grads"].values())
