"""The visual reversed-addition task (``data.task=visual_reversed_addition``): the CPU demo's
problems with each operand drawn as a small image, for a vision-language policy (issue 19).

The prompt is ``<bos> [image of a] + [image of b] =``: each operand's three digits (least
significant first, as in :mod:`rlsd_megatron.data.reversed_addition`) are drawn side by side in a
5x7 bitmap font, white on black, one digit per 8x8-pixel cell. With the tower's 4-pixel patches
merged 2x2 (``model.vision``: patch_size x spatial_merge_size must be 8) each cell becomes exactly
one image token, so the vision tower only has to tell ten glyphs apart and the decoder sees the
same layout as in the text task. The answer, the reward (exact match of the reversed sum) and the
hint (the answer, after the question: ``[a]+[b]|9750=``, the images in the teacher's prompt too)
are the text task's. Images go through the model's image processor (transformers' Qwen2-VL one)
like a data file's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rlsd_megatron.config import VisionConfig
from rlsd_megatron.data import reversed_addition as task
from rlsd_megatron.data.addition_prompts import ReversedAdditionPrompts
from rlsd_megatron.data.images import IMAGE_PLACEHOLDER, expand_image_tokens, image_token_counts
from rlsd_megatron.data.prompts import PromptRow
from rlsd_megatron.data.readers import DataError
from rlsd_megatron.data.teacher_context import TeacherContextBuilder

__all__ = ["CELL", "IMAGE_TOKEN_ID", "VisualReversedAdditionPrompts", "draw_digits"]

CELL = 8  # pixels per digit cell side: one image token each
IMAGE_TOKEN_ID = len(task.TOKENS)  # the one token past the text task's alphabet (vocabulary 17)
# 5x7 glyphs of the digits, '#' lit.
GLYPHS = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}


def draw_digits(digits: str):
    """A PIL RGB image [CELL, CELL·len(digits)] of `digits`, one glyph per cell."""
    from PIL import Image

    pixels = np.zeros((CELL, CELL * len(digits)), dtype=np.uint8)
    for k, digit in enumerate(digits):
        glyph = np.array([[ch == "#" for ch in row] for row in GLYPHS[digit]], dtype=np.uint8) * 255
        pixels[0:7, CELL * k + 1: CELL * k + 6] = glyph
    return Image.fromarray(pixels).convert("RGB")


class VisualReversedAdditionPrompts(ReversedAdditionPrompts):
    """Reversed 3-digit addition with the operands as images (module docstring); rows carry
    `images` (two per prompt), splits and indices as :class:`ReversedAdditionPrompts`."""

    def __init__(self, split: str = "train", *, vision: VisionConfig | None, val_size: int = 256,
                 val_seed: int = 10**6, teacher_template: str | None = None) -> None:
        if vision is None or vision.patch_size * vision.spatial_merge_size != CELL \
                or vision.image_token_id != IMAGE_TOKEN_ID:
            raise DataError(f"data.task=visual_reversed_addition needs a vision-language model (model.vision) with "
                            f"patch_size x spatial_merge_size = {CELL} and image_token_id = {IMAGE_TOKEN_ID}; got "
                            f"{vision} (see examples/configs/cpu_demo_visual.yaml)")
        super().__init__(split, val_size=val_size, val_seed=val_seed, teacher_template=teacher_template)
        self.name = f"visual_reversed_addition/{split}"
        self.vision = vision
        self.teacher_context = TeacherContextBuilder(
            self.render_prompt, max_reference_tokens=None, template=self.teacher_context.template,
            sdpo_template=self.teacher_context.sdpo_template, image_tokens=(IMAGE_TOKEN_ID, vision.spatial_merge_size))
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        pixels = CELL * CELL * 3  # one 3-digit operand, kept at its size
        self.processor = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                                  temporal_patch_size=vision.temporal_patch_size,
                                                  min_pixels=pixels, max_pixels=pixels)
        self._patches: dict[str, tuple] = {}  # operand digits -> (pixel patches, grid): 1000 at most

    def operand_patches(self, digits: str):
        """The processor's (pixel patches [12, C·T·P²], grid [1, 3]) of one operand's image,
        memoised: the processor costs far more than a training step's share of a row."""
        if digits not in self._patches:
            out = self.processor(images=[draw_digits(digits)], return_tensors="pt")
            self._patches[digits] = (out["pixel_values"].float(), out["image_grid_thw"].long())
        return self._patches[digits]

    def render_prompt(self, user_text: str) -> list[int]:
        ids = [self.tokenizer.bos_id]
        for i, piece in enumerate((user_text + "=").split(IMAGE_PLACEHOLDER)):
            ids += ([IMAGE_TOKEN_ID] if i else []) + self.tokenizer.encode(piece)
        return ids

    def __getitem__(self, index: int) -> PromptRow:
        from rlsd_megatron.models.vision_language import ImageInputs

        problem = self.problem(index)
        (a_pixels, a_grid), (b_pixels, b_grid) = (self.operand_patches(x) for x in problem.question.split("+"))
        images = ImageInputs(torch.cat([a_pixels, b_pixels]), torch.cat([a_grid, b_grid]))
        question = f"{IMAGE_PLACEHOLDER}+{IMAGE_PLACEHOLDER}"
        counts = image_token_counts(images.image_grid_thw, self.vision.spatial_merge_size)
        prompt = expand_image_tokens(self.render_prompt(question), counts, IMAGE_TOKEN_ID)
        return PromptRow(index, question, problem.answer, None, prompt, self.name, images)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != IMAGE_TOKEN_ID])

