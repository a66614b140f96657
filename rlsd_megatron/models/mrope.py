"""Qwen2.5-VL's and Qwen3-VL's 3-D rotary positions (M-RoPE) of one token sequence, and Qwen3-VL's
interleaved channel layout.

Each token gets a (time, height, width) position; megatron-core's `mrope` rotary embedding turns
the [3, B, S] positions into the rotation of each head's channels, `mrope_section` pairs per axis.
Text tokens advance all three together by one. An image's tokens (one per merge x merge block of
ViT patches, in row-major order) share the time position of the text before them and spread over
their grid's rows and columns from there; the text after the image continues from one past the
largest of the image's positions. This is transformers' `Qwen2_5_VLModel.get_rope_index` for
still images (videos, whose time positions depend on the frame rate, are not supported yet),
written on token ids and image grids alone so that it needs no HF model. Qwen3-VL places still
images the same way (its `get_rope_index` differs only for videos).

Which rotary channel pair follows which axis: Qwen2.5-VL gives each axis one contiguous chunk of
`mrope_section[axis]` pairs (megatron-core's `MultimodalRotaryEmbedding`); Qwen3-VL interleaves
them, pair j following height when j % 3 == 1 and j < 3·section[1], width when j % 3 == 2 and
j < 3·section[2], time otherwise (transformers' `Qwen3VLTextRotaryEmbedding`), which
megatron-core 0.19.2 does not offer: `InterleavedMultimodalRotaryEmbedding` below.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding


def mrope_position_ids(tokens: torch.Tensor, image_grid_thw: torch.Tensor, *, image_token_id: int,
                       spatial_merge_size: int) -> torch.Tensor:
    """[3, L] positions of `tokens` [L], whose images (in order) have patch grids `image_grid_thw`
    [n_images, 3] (t, h, w in ViT patches, as the HF image processor gives them).

    Each image is a run of t·h·w / merge² consecutive `image_token_id` tokens. Raises ValueError
    when the image tokens do not match the grids (a prompt built without the model's processor).
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    is_image = (tokens == image_token_id).tolist()
    grids = [tuple(int(x) for x in grid) for grid in image_grid_thw.reshape(-1, 3).tolist()]
    pieces: list[torch.Tensor] = []
    next_position = 0  # the position the next text token gets
    i = image = 0
    while i < len(is_image):
        if not is_image[i]:
            end = i
            while end < len(is_image) and not is_image[end]:
                end += 1
            pieces.append(torch.arange(next_position, next_position + end - i).expand(3, -1))
            next_position += end - i
            i = end
            continue
        if image >= len(grids):
            raise ValueError(f"image token at position {i} beyond the {len(grids)} image grid(s) given")
        t, h, w = grids[image][0], grids[image][1] // spatial_merge_size, grids[image][2] // spatial_merge_size
        count = t * h * w
        if i + count > len(is_image) or not all(is_image[i:i + count]):
            raise ValueError(f"image {image} (grid {grids[image]}) needs {count} consecutive image tokens from "
                             f"position {i}; the prompt has fewer: build it with the model's processor")
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
        pieces.append(grid.reshape(3, count) + next_position)
        next_position += max(h, w)
        i += count
        image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} image grid(s) given but the tokens hold {image} image(s)")
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def interleaved_mrope_axes(mrope_section: list[int], pairs: int) -> torch.Tensor:
    """[pairs] axis (0 time, 1 height, 2 width) whose position rotates each channel pair under
    Qwen3-VL's interleaved M-RoPE (`pairs` = head_dim / 2 = sum(mrope_section))."""
    if sum(mrope_section) != pairs or any(3 * mrope_section[axis] > pairs for axis in (1, 2)):
        raise ValueError(f"interleaved mrope_section {mrope_section} must sum to head_dim/2 = {pairs} with "
                         f"3 x its height and width entries at most {pairs}")
    axes = torch.zeros(pairs, dtype=torch.long)
    for axis in (1, 2):
        axes[axis:3 * mrope_section[axis]:3] = axis
    return axes


class InterleavedMultimodalRotaryEmbedding(MultimodalRotaryEmbedding):
    """megatron-core's `MultimodalRotaryEmbedding` with Qwen3-VL's interleaved channel layout (the
    same inverse frequencies and output, [S, B, 1, head_dim], rotate-half convention)."""

    def forward(self, position_ids: torch.Tensor, mrope_section: list[int],
                cp_group: Optional[torch.distributed.ProcessGroup] = None) -> torch.Tensor:
        """Rotary angles [S, B, 1, head_dim] of `position_ids` [3, B, S]."""
        if self.rotary_interleaved or (cp_group is not None and cp_group.size() > 1):
            raise NotImplementedError("interleaved M-RoPE is built for rotate-half rotary channels without "
                                      "context parallelism")
        seq = position_ids.to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            seq = seq / self.seq_len_interpolation_factor
        freqs = seq[..., None] * self.inv_freq  # [3, B, S, pairs]
        axes = interleaved_mrope_axes(mrope_section, freqs.shape[-1]).to(freqs.device)
        freqs = freqs.gather(0, axes.expand(1, *freqs.shape[1:])).squeeze(0)  # [B, S, pairs]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb[..., None, :].transpose(0, 1).contiguous()
