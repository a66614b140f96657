"""The embedded engine of a vision-language policy (issue 19): generation with images, and the
weight sync of every vision-tower tensor.

- Greedy generation of the engine (our M-RoPE positions, left-padded batch of prompts with one,
  two and no images) equals transformers' own `generate` on the same weights, prompt by prompt
  (its positions from its own `get_rope_index`): exact tokens, 6 new tokens each.
- A learner at TP=2 and at PP=2 (2 gloo processes) synced into the engine, straight into its
  parameters and as buckets: every engine tensor, the vision tower's included, is bit-identical
  to the HF model the learner was loaded from; a different image changes what the engine says.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.hf_models import random_hf_vision_language_model, tiny_vision_language_model

MODEL = tiny_vision_language_model()
IMAGE = MODEL.vision.image_token_id
NEW_TOKENS = 6


def image(grid: tuple[int, int, int], seed: int):
    from rlsd_megatron.models.vision_language import ImageInputs

    v = MODEL.vision
    width = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    pixels = torch.randn(grid[0] * grid[1] * grid[2], width, generator=torch.Generator().manual_seed(seed))
    return ImageInputs(pixels, torch.tensor([grid]))


def merged(*inputs):
    from rlsd_megatron.models.vision_language import ImageInputs

    return ImageInputs(torch.cat([x.pixel_values for x in inputs]), torch.cat([x.image_grid_thw for x in inputs]))


def prompts() -> tuple[list[list[int]], list]:
    """Three prompts: one image (6 tokens), two images (6 + 8 tokens), text only."""
    a, b, c = image((1, 4, 6), 1), image((1, 4, 6), 2), image((1, 8, 4), 3)
    return ([[5, 6, *[IMAGE] * 6, 7, 8], [9, *[IMAGE] * 6, 10, 11, *[IMAGE] * 8, 12, 13, 14], [15, 16, 17]],
            [a, merged(b, c), None])


def hf_greedy(hf, prompt: list[int], images) -> list[int]:
    ids = torch.tensor([prompt])
    extra = {}
    if images is not None:
        extra = dict(pixel_values=images.pixel_values, image_grid_thw=images.image_grid_thw,
                     mm_token_type_ids=(ids == IMAGE).int())
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                      min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0, **extra)
    return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers():
    from rlsd_megatron.rollout import SamplingParams
    from rlsd_megatron.rollout.embedded import EmbeddedEngine

    hf = random_hf_vision_language_model(MODEL)
    engine = EmbeddedEngine(MODEL)
    targets = engine.writable_weights()
    state = hf.state_dict()
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(state[name])
    engine.weights_written(set(targets), version=0)
    texts, pictures = prompts()
    sampling = SamplingParams(n=2, temperature=0.0, max_new_tokens=NEW_TOKENS)
    got = engine.generate(texts, sampling, images=pictures)
    for i, (prompt, x) in enumerate(zip(texts, pictures)):
        want = hf_greedy(hf, prompt, x)
        for sample in got[2 * i: 2 * i + 2]:
            assert sample.token_ids == want, f"prompt {i}: engine {sample.token_ids} vs transformers {want}"
    # The images steer generation: another picture in prompt 0 changes the engine's log-probs.
    other = engine.generate(texts[:1], sampling, images=[image((1, 4, 6), 9)])[0]
    assert other.token_ids != got[0].token_ids or \
        max(abs(a - b) for a, b in zip(other.log_probs, got[0].log_probs)) > 1e-3


def sync_into_engine(hf_state: dict) -> dict:
    """Learners at TP=2 and at PP=2 → embedded engine on rank 0, both sync paths: the engine's tensors."""
    from rlsd_megatron.config import Config, ParallelConfig
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.models.hf_mapping import hf_to_megatron
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.rollout import reshard_to_hf, sync_weights
    from rlsd_megatron.rollout.embedded import EmbeddedEngine

    out = {}
    for tp, pp, path in ((2, 1, "direct"), (1, 2, "buckets"), (2, 1, "buckets"), (1, 2, "direct")):
        with model_parallel(tp=tp, pp=pp):
            learner = Learner(Config(model=MODEL, parallel=ParallelConfig(tp=tp, pp=pp)))
            learner.load_full_state(dict(hf_to_megatron(hf_state.__getitem__, MODEL)))
            engine = EmbeddedEngine(MODEL) if dist.get_rank() == 0 else None
            if path == "direct":
                sync_weights(learner.model, MODEL, engine, version=1)
            else:
                stream = reshard_to_hf(learner.model, MODEL, bucket_bytes=16 * 1024)
                if engine is not None:
                    engine.update_weights(stream, version=1)
                else:
                    for bucket in stream:
                        del bucket
            if engine is not None:
                out[(tp, pp, path)] = {name: t.clone() for name, t in engine.writable_weights().items()}
    return out


def test_sync_covers_the_vision_tower(dist_pool):
    hf = random_hf_vision_language_model(MODEL, seed=4)
    state = hf.state_dict()
    got = dist_pool(2).run(sync_into_engine, state, timeout=600)[0]
    assert len(got) == 4
    for path, tensors in got.items():
        vision = [name for name in tensors if name.startswith("model.visual.")]
        assert len(vision) == sum(name.startswith("model.visual.") for name in state) > 10, path
        for name, tensor in tensors.items():
            assert torch.equal(tensor, state[name]), f"{path}: {name} differs from the learner's source weights"


def test_image_token_is_never_drawn():
    """A banned token (the image placeholder) is not drawn even where it holds 99% of the mass,
    greedy or sampled; the reported log-probs stay those of the whole distribution."""
    from rlsd_megatron.rollout import SamplingParams
    from rlsd_megatron.rollout.embedded import sample_tokens

    logits = torch.tensor([[0.0, 1.0, 8.0, 0.5]]).repeat(64, 1)
    uniforms = torch.linspace(0, 0.999, 64)
    for sampling in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
                     SamplingParams(temperature=1.0, top_p=0.9)):
        tokens, logp = sample_tokens(logits, sampling, uniforms, banned_token_ids=[2])
        assert (tokens != 2).all(), sampling
        want = torch.log_softmax(logits / max(sampling.temperature, 1.0), -1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(logp, want)
    assert set(sample_tokens(logits, SamplingParams(temperature=1.0), uniforms, [2])[0].tolist()) == {0, 1, 3}
