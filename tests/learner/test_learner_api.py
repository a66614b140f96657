"""Learner.forward_sequences (per-token outputs per sequence on every rank) and use_weights
(scoring with another copy of the weights, restored afterwards), at PP=2 against PP=1."""

from __future__ import annotations

import torch

from rlsd_megatron.config import Config, ModelConfig, ParallelConfig, TrainConfig

MODEL = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64)


def _sequences():
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, 50, (n,), generator=gen) for n in (7, 4, 9, 5, 6)]


def _log_probs(logits, mb):
    from rlsd_megatron.ops import token_log_probs

    return {"logp": token_log_probs(logits, mb.targets, vocab_size=MODEL.vocab_size)}


def scores(pp: int, full_state, other_state) -> dict:
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    cfg = Config(model=MODEL, parallel=ParallelConfig(pp=pp), train=TrainConfig(micro_batch_size=2))
    with model_parallel(pp=pp):
        learner = Learner(cfg)
        learner.load_full_state(other_state)
        other_weights = {k: v.clone() for k, v in learner.local_weights().items()}
        learner.load_full_state(full_state)
        own = learner.forward_sequences(_sequences(), _log_probs)["logp"]
        with learner.use_weights(other_weights):
            swapped = learner.forward_sequences(_sequences(), _log_probs)["logp"]
        again = learner.forward_sequences(_sequences(), _log_probs)["logp"]
    return {"own": own, "swapped": swapped, "again": again}


def make_states():
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    states = []
    for seed in (1, 2):
        with model_parallel(seed=seed):
            states.append(Learner(Config(model=MODEL)).full_state())
    return states


def all_cases():
    first, second = make_states()
    return {pp: scores(pp, first, second) for pp in (1, 2)}


def test_forward_sequences_and_use_weights(dist_pool):
    results = dist_pool(2).run(all_cases)
    reference = results[0][1]
    for rank_result in results:  # every rank holds the outputs, PP=2 equals PP=1
        for pp, result in rank_result.items():
            for key in ("own", "swapped", "again"):
                for got, want, seq in zip(result[key], reference[key], _sequences()):
                    assert got.shape == seq.shape and got[0] == 0.0
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for own, swapped, again in zip(reference["own"], reference["swapped"], reference["again"]):
        assert not torch.allclose(own[1:], swapped[1:])  # the other weights were really used
        assert torch.equal(own, again)  # and the model's own weights came back
