"""The visual reversed-addition task: operands drawn as digit images, one image token per digit,
the text task's answers, reward and hint (the teacher's prompt with the same images)."""

import dataclasses

import numpy as np
import pytest
import torch

from rlsd_megatron.config import load_config
from rlsd_megatron.data import DataError, ReversedAdditionPrompts
from rlsd_megatron.data.visual_addition import GLYPHS, IMAGE_TOKEN_ID, VisualReversedAdditionPrompts, draw_digits

VISION = load_config("examples/configs/cpu_demo_visual.yaml").model.vision


def test_digits_are_drawn_one_per_cell():
    pixels = np.array(draw_digits("907"))[:, :, 0] > 0
    assert pixels.shape == (8, 24)
    for k, digit in enumerate("907"):
        want = np.array([[ch == "#" for ch in row] for row in GLYPHS[digit]])
        assert (pixels[:7, 8 * k + 1: 8 * k + 6] == want).all(), digit
        assert pixels[:, 8 * k].sum() == 0 and pixels[7].sum() == 0  # cells do not touch


def test_rows_hold_the_operands_as_images():
    dataset = VisualReversedAdditionPrompts("train", vision=VISION)
    text = ReversedAdditionPrompts("train")
    row = dataset[123 * 1000 + 456]
    assert row.answer == text[123 * 1000 + 456].answer == "9750"
    tok = dataset.tokenizer
    assert row.prompt_ids == [tok.bos_id, *[IMAGE_TOKEN_ID] * 3, *tok.encode("+"), *[IMAGE_TOKEN_ID] * 3,
                              *tok.encode("=")]
    assert row.images.image_grid_thw.tolist() == [[1, 2, 6], [1, 2, 6]]
    # The same operand gives the same patches; another operand other patches.
    same_a = dataset[123 * 1000 + 7].images.pixel_values
    patches = row.images.pixel_values.shape[0] // 2
    torch.testing.assert_close(same_a[:patches], row.images.pixel_values[:patches], rtol=0, atol=0)
    assert not torch.equal(same_a[patches:], row.images.pixel_values[patches:])
    teacher = dataset.teacher_context.build(row.question, row.answer, tok.encode("9750"), images=row.images)
    assert teacher.images is row.images
    assert dataset.decode(teacher.input_ids) == "+|9750=9750"  # image tokens and <bos> are not text


def test_reward_is_the_text_tasks():
    from rlsd_megatron.config import RewardConfig
    from rlsd_megatron.rewards import RewardScorer, RewardSample

    dataset = VisualReversedAdditionPrompts("val", vision=VISION, val_size=4)
    row = dataset[0]
    right = [*dataset.tokenizer.encode(row.answer), dataset.eos_id]
    samples = [RewardSample(response=dataset.decode(ids), ground_truth=row.answer, response_length=len(ids),
                            response_ids=ids) for ids in (right, right[:-1])]
    with RewardScorer(RewardConfig(overlong_factor=0.0), task="visual_reversed_addition") as scorer:
        assert scorer.score(samples).rewards.tolist() == [1.0, 0.0]


def test_needs_a_matching_vision_tower():
    with pytest.raises(DataError, match="patch_size x spatial_merge_size = 8"):
        VisualReversedAdditionPrompts("train", vision=dataclasses.replace(VISION, patch_size=14))
    with pytest.raises(DataError, match="needs a vision-language model"):
        VisualReversedAdditionPrompts("train", vision=None)
