"""The embedded CPU engine: reproducible seeded sampling independent of batching, stop tokens and
max length, log-probs against a full forward of the same model, truncation rules, weight-update
errors that name the tensor."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from rlsd_megatron.config import ModelConfig
from rlsd_megatron.models.hf_mapping import MappingError
from rlsd_megatron.rollout.embedded import EmbeddedEngine, _torch_threads, sample_tokens
from rlsd_megatron.rollout.engine import SamplingParams
from rlsd_megatron.rollout.buckets import pack_buckets

MODEL = ModelConfig(family="qwen3", vocab_size=61, hidden_size=32, num_layers=2, num_attention_heads=4,
                    num_query_groups=2, kv_channels=16, ffn_hidden_size=48, qk_layernorm=True, tie_word_embeddings=True)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11], [3]]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    engine = EmbeddedEngine(MODEL)
    with torch.no_grad():  # sharpen the distribution a little so samples are varied but not uniform
        for param in engine.model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return engine


def tokens(generations):
    return [g.token_ids for g in generations]


def test_seeded_generation_is_reproducible_and_batch_invariant(engine):
    sampling = SamplingParams(n=3, temperature=0.9, top_p=0.9, top_k=20, max_new_tokens=6, seed=5)
    first = engine.generate(PROMPTS, sampling)
    assert [(g.prompt_index, g.sample_index) for g in first] == [(i, j) for i in range(4) for j in range(3)]
    assert tokens(engine.generate(PROMPTS, sampling)) == tokens(first)
    engine.max_batch_size = 3  # one prompt per forward batch
    try:
        assert tokens(engine.generate(PROMPTS, sampling)) == tokens(first)
    finally:
        engine.max_batch_size = 256
    shifted = engine.generate(PROMPTS[2:], sampling, prompt_offset=2)  # a share of the batch, as DP engines get
    assert tokens(shifted) == tokens(first[6:]) and shifted[0].prompt_index == 2
    other = engine.generate(PROMPTS, SamplingParams(n=3, temperature=0.9, top_p=0.9, top_k=20, max_new_tokens=6, seed=6))
    assert tokens(other) != tokens(first)
    assert len({tuple(t) for t in tokens(first)}) > 6  # samples of one prompt differ


def test_stop_tokens_and_max_length(engine):
    stop = tuple(range(0, 61, 4))
    generations = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=7, stop_token_ids=stop, seed=1))
    reasons = {g.finish_reason for g in generations}
    assert reasons == {"stop", "length"}, reasons
    for g in generations:
        assert 1 <= len(g.token_ids) <= 7 and len(g.log_probs) == len(g.token_ids)
        assert not any(t in stop for t in g.token_ids[:-1])
        if g.finish_reason == "stop":
            assert g.token_ids[-1] in stop
        else:
            assert len(g.token_ids) == 7 and g.token_ids[-1] not in stop


def reference_logits(engine, prompt, generated, presence_penalty=0.0):
    """Full-sequence forward (no KV cache); the logits predicting each generated token, minus
    the presence penalty on tokens generated before it."""
    seq = torch.tensor(prompt + generated)
    with torch.no_grad(), _torch_threads(1):
        logits = engine.model(seq[None]).logits[0, len(prompt) - 1:-1].float()
    for t in range(1, len(generated)):
        logits[t, sorted(set(generated[:t]))] -= presence_penalty
    return logits


def reference_log_probs(engine, prompt, generated, temperature, presence_penalty=0.0):
    logp = torch.log_softmax(reference_logits(engine, prompt, generated, presence_penalty) / temperature, -1)
    return logp.gather(1, torch.tensor(generated)[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, -1), (0.7, 0.8, 20), (1.3, 0.5, 3)])
def test_log_probs_are_the_tempered_untruncated_distribution(engine, temperature, top_p, top_k):
    sampling = SamplingParams(n=2, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=5, seed=2)
    for g in engine.generate(PROMPTS, sampling):
        want = reference_log_probs(engine, PROMPTS[g.prompt_index], g.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(g.log_probs), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_presence_penalty_on_generated_tokens(engine, temperature):
    sampling = SamplingParams(n=2, temperature=temperature, max_new_tokens=8, seed=3, presence_penalty=2.0)
    plain = engine.generate(PROMPTS, SamplingParams(n=2, temperature=temperature, max_new_tokens=8, seed=3))
    penalised = engine.generate(PROMPTS, sampling)
    assert tokens(penalised) != tokens(plain)
    for g in penalised:
        prompt = PROMPTS[g.prompt_index]
        if temperature == 0:
            assert g.token_ids == reference_logits(engine, prompt, g.token_ids, 2.0).argmax(-1).tolist()
        want = reference_log_probs(engine, prompt, g.token_ids, temperature or 1.0, presence_penalty=2.0)
        torch.testing.assert_close(torch.tensor(g.log_probs), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="presence_penalty=3"):
        SamplingParams(presence_penalty=3)


def test_greedy(engine):
    for g in engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=4)):
        seq = PROMPTS[g.prompt_index] + g.token_ids
        with torch.no_grad(), _torch_threads(1):
            logits = engine.model(torch.tensor(seq)[None]).logits[0, len(PROMPTS[g.prompt_index]) - 1:-1]
        assert g.token_ids == logits.argmax(-1).tolist()
        want = reference_log_probs(engine, PROMPTS[g.prompt_index], g.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(g.log_probs), want, rtol=0, atol=1e-5)


def test_truncation_rules_and_sampling_frequencies():
    probs = torch.tensor([[0.4, 0.25, 0.2, 0.1, 0.05]])
    logits = probs.log()
    uniforms = (torch.arange(10000) + 0.5) / 10000  # exact quantiles: frequencies = the sampling distribution
    rows = logits.expand(10000, -1)

    def freq(**kw):
        toks, lp = sample_tokens(rows, SamplingParams(**kw), uniforms)
        torch.testing.assert_close(lp, torch.log_softmax(rows / kw.get("temperature", 1.0), -1).gather(1, toks[:, None]).squeeze(1))
        return torch.bincount(toks, minlength=5).float() / 10000

    torch.testing.assert_close(freq(), probs[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(freq(top_k=2), torch.tensor([0.4, 0.25, 0, 0, 0]) / 0.65, atol=1e-3, rtol=0)
    # top_p=0.6: 0.4 is kept (nothing before it), 0.25 kept (0.4 < 0.6), 0.2 dropped (0.65 > 0.6).
    torch.testing.assert_close(freq(top_p=0.6), torch.tensor([0.4, 0.25, 0, 0, 0]) / 0.65, atol=1e-3, rtol=0)
    hot = torch.softmax(logits[0] / 2.0, -1)
    torch.testing.assert_close(freq(temperature=2.0), hot, atol=1e-3, rtol=0)


def test_update_weights_checks_names_shapes_and_completeness():
    engine = EmbeddedEngine(MODEL)
    state = [(n, p.detach().clone() + 1) for n, p in engine.model.named_parameters()]
    engine.update_weights(pack_buckets(state, bucket_bytes=4096), version=3)
    assert engine.health().weight_version == 3
    assert all(torch.equal(dict(engine.model.named_parameters())[n], t) for n, t in state)
    with pytest.raises(MappingError, match="'model.layers.0.extra', which the embedded qwen3 model does not have"):
        engine.update_weights(pack_buckets(state + [("model.layers.0.extra", torch.ones(2))]), version=4)
    bad = [(n, torch.ones(3, 3)) if n == "model.norm.weight" else (n, t) for n, t in state]
    with pytest.raises(MappingError, match=r"'model.norm.weight' with shape \(3, 3\), the embedded model's parameter is \(32,\)"):
        engine.update_weights(pack_buckets(bad), version=4)
    with pytest.raises(MappingError, match=r"left parameters unset: \['model.norm.weight'\]"):
        engine.update_weights(pack_buckets([(n, t) for n, t in state if n != "model.norm.weight"]), version=4)
    assert engine.health().weight_version == 3


def test_sleep_wake_and_bad_params(engine):
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, SamplingParams())
    engine.wake()
    assert engine.health().ok and not engine.health().asleep
    with pytest.raises(ValueError, match=r"n=0 .*top_p=1.5"):
        SamplingParams(n=0, top_p=1.5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())


def test_data_parallel_fan_out_samples_what_one_engine_does(engine):
    from rlsd_megatron.rollout.data_parallel import DataParallelEngines

    twin = EmbeddedEngine(MODEL)
    twin.model.load_state_dict(engine.model.state_dict())
    sampling = SamplingParams(n=2, temperature=0.9, max_new_tokens=5, seed=4)
    fanned = DataParallelEngines([engine, twin]).generate(PROMPTS, sampling)
    assert [(g.prompt_index, g.sample_index) for g in fanned] == [(i, j) for i in range(4) for j in range(2)]
    assert tokens(fanned) == tokens(engine.generate(PROMPTS, sampling))


def test_data_parallel_weight_sync_feeds_every_engine_one_bucket_at_a_time():
    import weakref

    from dataclasses import replace

    from rlsd_megatron.rollout.data_parallel import DataParallelEngines

    class SlowEngine(EmbeddedEngine):
        """Takes 5 ms between receiving a bucket and copying it, as a busy engine would."""

        def update_weights(self, buckets, version):
            def late(stream):
                for bucket in stream:
                    time.sleep(0.005)
                    yield bucket
                    del bucket

            super().update_weights(late(buckets), version)

    alive, peak = weakref.WeakSet(), [0]

    def tracked(stream):
        for bucket in stream:
            alive.add(bucket)
            peak[0] = max(peak[0], len(alive))
            yield bucket
            del bucket

    engines = [EmbeddedEngine(MODEL), SlowEngine(MODEL)]
    state = [(n, torch.randn_like(p)) for n, p in engines[0].model.named_parameters()]
    DataParallelEngines(engines).update_weights(tracked(pack_buckets(state, bucket_bytes=4096)), version=7)
    for engine in engines:
        assert engine.health().weight_version == 7
        assert all(torch.equal(dict(engine.model.named_parameters())[n], t) for n, t in state)
    # The next bucket is drawn only once both engines let go of the current one.
    assert peak[0] == 1

    # One engine refusing a tensor fails the sync with its error; the other is not left waiting.
    narrow = EmbeddedEngine(replace(MODEL, hidden_size=16, ffn_hidden_size=32))
    with pytest.raises(MappingError, match="shape"):
        DataParallelEngines([engines[0], narrow]).update_weights(pack_buckets(state, bucket_bytes=4096), version=8)


def test_sampling_params_from_config_training_and_validation():
    from rlsd_megatron.config import RolloutConfig
    from rlsd_megatron.rollout.provider import sampling_params

    rollout = RolloutConfig(n=4, temperature=1.0, top_k=-1, max_new_tokens=9, val_temperature=0.7, val_top_p=0.8,
                            val_top_k=20, val_presence_penalty=1.5, val_n=2)
    train = sampling_params(rollout, stop_token_ids=[5], seed=1)
    assert (train.n, train.temperature, train.top_k, train.presence_penalty, train.stop_token_ids) == (4, 1.0, -1, 0.0, (5,))
    val = sampling_params(rollout, validation=True)
    assert (val.n, val.temperature, val.top_p, val.top_k, val.presence_penalty, val.max_new_tokens) == (2, 0.7, 0.8, 20, 1.5, 9)
    # Routing replay: training draws ask for the routed experts, validation never does.
    assert not train.return_routed_experts
    replay = dataclasses.replace(rollout, routing_replay=True)
    assert sampling_params(replay).return_routed_experts and not sampling_params(replay, validation=True).return_routed_experts


def test_routed_experts_are_the_routers_choices_on_every_token_the_engine_ran():
    """Routing replay's record: each sample's experts per layer for its prompt and every response
    token but the last, as a full forward of the same model over those tokens routes them (the
    prefill's left padding, KV-cached decoding and rows leaving the batch must not misplace them)."""
    from tests.hf_models import tiny_model

    moe = tiny_model("qwen3_moe", vocab_size=61)
    torch.manual_seed(0)
    engine = EmbeddedEngine(moe, return_routed_experts=True)
    with torch.no_grad():  # spread the router logits, so that every expert is chosen
        for param in engine.model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    stop = tuple(range(0, 61, 5))  # some samples stop early, the others run to the limit
    sampling = SamplingParams(n=2, max_new_tokens=6, stop_token_ids=stop, seed=3, return_routed_experts=True)
    generations = engine.generate(PROMPTS, sampling)
    assert {g.finish_reason for g in generations} == {"stop", "length"}
    full = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, args, out: full.append(out[2].sort(-1).values))
             for layer in engine.model.model.layers]
    used = set()
    for g in generations:
        ran = PROMPTS[g.prompt_index] + g.token_ids[:-1]
        full.clear()
        with torch.no_grad():
            engine.model(torch.tensor([ran]))
        want = torch.stack(full, dim=1)  # [tokens, layers, k]
        assert g.routed_experts.dtype == torch.uint8 and g.routed_experts.shape == (len(ran), 2, 2)
        assert torch.equal(g.routed_experts.long().sort(-1).values, want), (g.prompt_index, g.sample_index)
        used |= set(want.flatten().tolist())
    for hook in hooks:
        hook.remove()
    assert used == {0, 1, 2, 3}
    # Validation and evaluation draws do not ask: nothing recorded, the same samples.
    unasked = engine.generate(PROMPTS, dataclasses.replace(sampling, return_routed_experts=False))
    assert all(g.routed_experts is None for g in unasked) and not engine._routing
    assert [g.token_ids for g in unasked] == [g.token_ids for g in generations]
    plain = EmbeddedEngine(moe)
    assert plain.generate(PROMPTS[:1], SamplingParams(n=1, max_new_tokens=2, seed=3))[0].routed_experts is None
    with pytest.raises(ValueError, match="engine built without them"):
        plain.generate(PROMPTS[:1], sampling)
    with pytest.raises(ValueError, match="MoE"):
        EmbeddedEngine(MODEL, return_routed_experts=True)
