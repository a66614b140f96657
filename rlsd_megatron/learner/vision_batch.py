"""Micro-batches of image+text sequences for a vision-language learner (`model.vision`).

A padded ([B, S]) or packed THD ([1, T]) micro-batch (`learner.batch`) whose position ids are
M-RoPE's [3, B, S] (`models.mrope`; padding positions 0) and which carries its sequences'
images, concatenated in batch order as the vision tower consumes them and as the decoder input's
image placeholders are filled (a packed row's reading order is the sequences' order too).
Packed rows give M-RoPE positions for the whole row ([3, 1, T]): megatron-core's THD rotary
(`rope_utils._apply_rotary_pos_emb_thd`) then takes each sequence's frequencies at its offset in
the row instead of restarting text positions at 0, which is what M-RoPE's image positions need.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rlsd_megatron.config import VisionConfig
from rlsd_megatron.learner.batch import MicroBatch, packed_micro_batch, padded_micro_batch
from rlsd_megatron.models.mrope import mrope_position_ids
from rlsd_megatron.models.vision_language import ImageInputs


def vision_micro_batch(sequences: list[torch.Tensor], images: list[ImageInputs | None], vision: VisionConfig,
                       fields: dict[str, list[torch.Tensor]] | None = None, *, pad_to_multiple: int = 1,
                       packed: bool = False, pad_total_to_multiple: int = 1) -> MicroBatch:
    """Micro-batch of `sequences` ([L_i] token ids, image placeholders included) with `images[i]`
    the images of sequence i (None: text only): right-padded [B, S], or with `packed` one THD row
    (`packed_micro_batch`'s padding arguments)."""
    if len(images) != len(sequences):
        raise ValueError(f"{len(images)} image entries for {len(sequences)} sequences; give None for text-only ones")
    if packed:
        mb = packed_micro_batch(sequences, fields, pad_to_multiple=pad_to_multiple,
                                pad_total_to_multiple=pad_total_to_multiple)
        rows, starts = [0] * len(sequences), mb.offsets
    else:
        mb = padded_micro_batch(sequences, fields, pad_to_multiple=pad_to_multiple)
        rows, starts = list(range(len(sequences))), [0] * len(sequences)
    position_ids = torch.zeros(3, *mb.tokens.shape, dtype=torch.long)
    no_images = torch.zeros(0, 3, dtype=torch.long)
    for row, start, seq, seq_images in zip(rows, starts, sequences, images):
        grids = seq_images.image_grid_thw if seq_images is not None else no_images
        position_ids[:, row, start:start + len(seq)] = mrope_position_ids(
            seq, grids, image_token_id=vision.image_token_id, spatial_merge_size=vision.spatial_merge_size)
    present = [x for x in images if x is not None]
    merged = None
    if present:
        merged = ImageInputs(torch.cat([x.pixel_values for x in present]), torch.cat([x.image_grid_thw for x in present]))
    return replace(mb, position_ids=position_ids, images=merged)
