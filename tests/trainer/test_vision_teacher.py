"""The self-teacher of a vision-language policy sees the student's images (issue 19, spec §2).

Teacher contexts of every method carry the student prompt's images, each image's placeholder
expanded to as many tokens as in the student prompt; the teacher's log-probs of the response
tokens, taken by our learner (TP=1) with those images in context, equal transformers' own
Qwen2.5-VL on the same tokens and pixels (within 1e-5, fp32), and move when the images change or
are absent (the signal: the images reach the teacher, by more than 1e-3)."""

from __future__ import annotations

import torch

from rlsd_megatron.config import AlgorithmConfig
from rlsd_megatron.data.prompts import PromptRow
from rlsd_megatron.data.teacher_context import TeacherContextBuilder
from rlsd_megatron.trainer.rollouts import Rollouts
from tests.hf_models import random_hf_vision_language_model, tiny_vision_language_model

MODEL = tiny_vision_language_model()
IMAGE = MODEL.vision.image_token_id
GRID = (1, 4, 6)  # 6 image tokens after 2x2 merging
LOGP_TOL = 1e-5


def render(user_text: str) -> list[int]:
    """A toy chat template: 90 opens the user turn, each character a token, `<image>` the image
    token once, 91 opens the assistant turn."""
    ids = [90]
    for i, piece in enumerate(user_text.split("<image>")):
        ids += ([IMAGE] if i else []) + [ord(c) % 80 + 1 for c in piece]
    return ids + [91]


class ToyDataset:
    teacher_context = TeacherContextBuilder(render, max_reference_tokens=None, template="{question} hint {answer}",
                                            image_tokens=(IMAGE, MODEL.vision.spatial_merge_size))

    @staticmethod
    def decode(ids):
        return "".join(chr(48 + t % 10) for t in ids)


def images(seed: int):
    from rlsd_megatron.models.vision_language import ImageInputs

    v = MODEL.vision
    patches = GRID[0] * GRID[1] * GRID[2]
    width = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    return ImageInputs(torch.randn(patches, width, generator=torch.Generator().manual_seed(seed)), torch.tensor([GRID]))


def rollouts(row_images) -> Rollouts:
    question = "look <image> and add" if row_images is not None else "look and add"
    counts = [GRID[1] * GRID[2] // 4] if row_images is not None else []
    prompt = ToyDataset.teacher_context._splice(render(question), [], has_teacher=True, images=row_images).input_ids
    row = PromptRow(0, question, "7", None, prompt, "toy", row_images)
    assert sum(t == IMAGE for t in row.prompt_ids) == sum(counts)
    responses = [[11, 12, 13, 14], [21, 22, 23]]
    return Rollouts([row], responses, [[0.0] * len(r) for r in responses], ["stop"] * 2, torch.tensor([1.0, 0.0]))


def test_every_teacher_context_carries_the_images():
    from rlsd_megatron.trainer.teacher import teacher_contexts

    pictures = images(0)
    batch = rollouts(pictures)
    for method in ("rlsd", "opsd", "sdpo", "opd"):
        for context in teacher_contexts(AlgorithmConfig(method=method), batch, ToyDataset):
            prompt = context.input_ids[:context.response_start]
            assert context.images is pictures, method
            assert sum(t == IMAGE for t in prompt) == 6, method


def teacher_log_probs(hf_state: dict) -> dict[str, list[torch.Tensor]]:
    """The RLSD teacher's response log-probs with the images, with other images, and without."""
    from rlsd_megatron.config import Config
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.models.hf_mapping import hf_to_megatron
    from rlsd_megatron.ops import token_log_probs
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.teacher import teacher_contexts, teacher_response_outputs

    def log_prob_fn(logits, mb):
        return {"logp": token_log_probs(logits, mb.targets.to(logits.device), vocab_size=MODEL.vocab_size)}

    out = {}
    with model_parallel():
        learner = Learner(Config(model=MODEL))
        learner.load_full_state(dict(hf_to_megatron(hf_state.__getitem__, MODEL)))
        for name, pictures in (("images", images(0)), ("other_images", images(1)), ("text", None)):
            contexts = teacher_contexts(AlgorithmConfig(method="rlsd"), rollouts(pictures), ToyDataset)
            out[name] = teacher_response_outputs(contexts, log_prob_fn, learner=learner, weights=None)["logp"]
            out[name + "_contexts"] = contexts
    return out


def hf_log_probs(hf, context) -> torch.Tensor:
    ids = torch.tensor([context.input_ids])
    extra = {}
    if context.images is not None:
        extra = dict(pixel_values=context.images.pixel_values, image_grid_thw=context.images.image_grid_thw,
                     mm_token_type_ids=(ids == IMAGE).int())
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    positions = context.logit_positions
    return logp[positions, torch.tensor(context.input_ids)[[p + 1 for p in positions]]]


def test_teacher_log_probs_see_the_images(dist_pool):
    hf = random_hf_vision_language_model(MODEL)
    got = dist_pool(1).run(teacher_log_probs, hf.state_dict(), timeout=600)[0]
    for context, logp in zip(got["images_contexts"], got["images"]):
        torch.testing.assert_close(logp, hf_log_probs(hf, context), rtol=0, atol=LOGP_TOL)
    for other in ("other_images", "text"):
        gap = max(float((a - b).abs().max()) for a, b in zip(got["images"], got[other]))
        assert gap > 1e-3, f"the teacher's log-probs with {other} equal those with the images (gap {gap:.1e})"
