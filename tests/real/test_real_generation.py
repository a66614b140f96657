"""The embedded rollout engine on SmolLM2-135M-Instruct (the `real` tier).

The engine is built from our `ModelConfig` of the model (random weights), receives the model's
HF tensors as SGLang would, in buckets (`update_weights`), and then generates greedily for real
chat prompts in one left-padded batch: the tokens must be those of transformers' `generate` on
each prompt alone, EOS included where the model stops, and the reported log-probs those of a
full forward pass of transformers' model over prompt + response.
"""

from __future__ import annotations

import pytest
import torch

from tests.real.conftest import MAX_NEW_TOKENS, QUESTIONS

pytestmark = pytest.mark.real

LOGPROB_TOL = 1e-4  # fp32, KV-cached batched decoding vs one full forward (measured <= 1.4e-5)


@pytest.fixture(scope="module")
def engine(real_model, real_model_dir):
    from rlsd_megatron.rollout.buckets import pack_buckets
    from rlsd_megatron.rollout.embedded import EmbeddedEngine
    from tests.tools.test_convert import safetensors_state

    engine = EmbeddedEngine(real_model)
    state = safetensors_state(real_model_dir)
    engine.update_weights(pack_buckets(list(state.items()), bucket_bytes=64 * 2**20), version=1)
    return engine


def test_greedy_generation_matches_transformers(engine, real_tokenizer, hf_model, reference_greedy):
    from rlsd_megatron.data.teacher_context import hf_chat_renderer
    from rlsd_megatron.rollout import SamplingParams

    render = hf_chat_renderer(real_tokenizer)
    prompts = [render(q) for q in QUESTIONS]
    eos = real_tokenizer.eos_token_id
    generations = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS,
                                                          stop_token_ids=(eos,)))
    assert [g.token_ids for g in generations] == reference_greedy
    assert any(g.token_ids[-1] == eos and g.finish_reason == "stop" for g in generations)  # a real stop
    for prompt, g in zip(prompts, generations):
        assert eos not in g.token_ids[:-1]
        sequence = torch.tensor(prompt + g.token_ids)
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(sequence[None]).logits[0, len(prompt) - 1:-1], -1)
        want = logp.gather(1, torch.tensor(g.token_ids)[:, None]).squeeze(1)
        print(f"max |engine - forward log-prob| {float((torch.tensor(g.log_probs) - want).abs().max()):.1e}")
        torch.testing.assert_close(torch.tensor(g.log_probs), want, rtol=0, atol=LOGPROB_TOL)
