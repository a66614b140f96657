"""Micro-batches of image+text sequences for a vision-language learner (`model.vision`).

A padded micro-batch (`learner.batch.padded_micro_batch`) whose position ids are M-RoPE's
[3, B, S] (`models.mrope`; padding positions 0) and which carries its sequences' images,
concatenated in batch order as the vision tower consumes them and as the decoder input's image
placeholders are filled. Packed THD batches are not built for images yet: megatron-core 0.19.2's
M-RoPE takes [3, B, S] positions only.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rlsd_megatron.config import VisionConfig
from rlsd_megatron.learner.batch import MicroBatch, padded_micro_batch
from rlsd_megatron.models.mrope import mrope_position_ids
from rlsd_megatron.models.vision_language import ImageInputs


def vision_micro_batch(sequences: list[torch.Tensor], images: list[ImageInputs | None], vision: VisionConfig,
                       fields: dict[str, list[torch.Tensor]] | None = None, *, pad_to_multiple: int = 1) -> MicroBatch:
    """Right-padded [B, S] micro-batch of `sequences` ([L_i] token ids, image placeholders
    included) with `images[i]` the images of sequence i (None: text only)."""
    if len(images) != len(sequences):
        raise ValueError(f"{len(images)} image entries for {len(sequences)} sequences; give None for text-only ones")
    mb = padded_micro_batch(sequences, fields, pad_to_multiple=pad_to_multiple)
    batch, width = mb.tokens.shape
    position_ids = torch.zeros(3, batch, width, dtype=torch.long)
    no_images = torch.zeros(0, 3, dtype=torch.long)
    for i, (seq, seq_images) in enumerate(zip(sequences, images)):
        grids = seq_images.image_grid_thw if seq_images is not None else no_images
        position_ids[:, i, :len(seq)] = mrope_position_ids(seq, grids, image_token_id=vision.image_token_id,
                                                           spatial_merge_size=vision.spatial_merge_size)
    present = [x for x in images if x is not None]
    merged = None
    if present:
        merged = ImageInputs(torch.cat([x.pixel_values for x in present]), torch.cat([x.image_grid_thw for x in present]))
    return replace(mb, position_ids=position_ids, images=merged)
