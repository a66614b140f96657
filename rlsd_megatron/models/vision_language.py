"""A Qwen2.5-VL policy on megatron-core: transformers' vision tower feeding a Megatron `GPTModel`.

Design (issue 19):
- **The vision tower is transformers' own** (`Qwen2_5_VisionTransformerPretrainedModel`: patch
  embedding, windowed-attention ViT blocks, patch merger), run inside the learner on the first
  pipeline stage and replicated over TP. It is small next to the language model (about 0.7B of
  Qwen2.5-VL-7B's 8B, about 0.6B of Qwen3-VL-8B's), so sharding it buys little, while running HF's code
  makes its numerics HF's by construction and keeps its weights in HF's layout (no second
  mapping to get wrong; checkpoints, the converters and the SGLang sync name them as HF does).
  megatron-core's own vision modules (`CLIPViTModel` / `RADIOViTModel` of `llava_model.py`) have
  neither the 2-D vision RoPE nor the windowed attention of Qwen's ViT. Every TP rank sees the
  same images and receives the same gradient at the image positions (the decoder's first
  column-parallel layer all-reduces its input gradient), so the replicas compute identical
  gradients and stay identical without any extra communication; under DP, Megatron's DDP
  reduces them like every other parameter.
- **The language model is our existing Megatron decoder**: this class *is* a `GPTModel`
  (position_embedding_type="mrope", megatron-core's 3-D multimodal RoPE over [3, B, S] positions
  from `models.mrope`). `HybridModel` (0.19.2) has no M-RoPE. Subclassing rather than wrapping
  (as `LLaVAModel` wraps a `GPTModel` as `language_model`) keeps every decoder parameter's name
  what it is for text models, so the TP/PP sharding of `models.sharding`, the HF mapping of
  Qwen2 and tied embeddings across PP work unchanged; the vision tower's parameters sit under
  `vision_model.` with HF's names, replicated (no `tensor_model_parallel` attribute).
- **The image embeddings replace the embeddings of the image placeholder tokens** in the
  decoder input (`decoder_input=` of `GPTModel.forward`), in reading order of the batch, as
  HF's `masked_scatter` does. Later stages receive the hidden states through the pipeline as
  for text (`set_input_tensor` is GPTModel's).
- Checkpointing: the tower is a plain `nn.Module` child, so megatron-core's default
  `sharded_state_dict` saves its tensors as replicated across TP (and exists only on stage 0).
- `freeze_vision_tower`: the tower's parameters do not require gradients (Megatron's DDP and
  optimizer then skip them) and it runs without autograd.
Not yet: sequence parallelism and context parallelism (the image embeddings would have to be
scattered with the tokens), packed THD micro-batches (the M-RoPE of megatron-core 0.19.2 takes
[3, B, S] positions), videos.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel

from rlsd_megatron.config import ConfigError, VisionConfig
from rlsd_megatron.models.vision_config import build_vision_tower


@dataclass
class ImageInputs:
    """The images of one micro-batch, as the HF image processor gives them, in reading order."""

    pixel_values: torch.Tensor  # [patches, channels · temporal_patch · patch²] flattened ViT patches
    image_grid_thw: torch.Tensor  # [images, 3] patch grid (t, h, w) of each image

    def to(self, device: torch.device) -> "ImageInputs":
        return ImageInputs(self.pixel_values.to(device), self.image_grid_thw.to(device))


class VisionLanguageModel(GPTModel):
    """`GPTModel` with M-RoPE whose first stage embeds images into the decoder input.

    `forward(input_ids [B, S], position_ids [3, B, S], attention_mask, images=ImageInputs | None,
    **GPTModel kwargs)`; everything else is GPTModel's.
    """

    def __init__(self, *, vision: VisionConfig, freeze_vision_tower: bool, **gpt_kwargs):
        super().__init__(position_embedding_type="mrope", **gpt_kwargs)
        if self.config.sequence_parallel or self.config.context_parallel_size > 1:
            raise ConfigError("a vision-language model (model.vision) does not support parallel.sequence_parallel "
                              "or parallel.cp > 1 yet; turn them off")
        self.image_token_id = vision.image_token_id
        self.freeze_vision_tower = freeze_vision_tower
        if self.pre_process:
            self.vision_model = build_vision_tower(vision)
            self.vision_model.requires_grad_(not freeze_vision_tower)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, *,
                images: ImageInputs | None = None, **kwargs):
        if self.pre_process and decoder_input is None:
            decoder_input = self.embed(input_ids, images)
        return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input, **kwargs)

    def embed(self, input_ids: torch.Tensor, images: ImageInputs | None) -> torch.Tensor:
        """Decoder input [S, B, H]: token embeddings, with the image placeholders' rows replaced
        by the vision tower's embeddings of `images` (batch-major reading order)."""
        embeddings = self.embedding(input_ids=input_ids, position_ids=None)
        placeholders = input_ids == self.image_token_id  # [B, S]
        count = int(placeholders.sum())
        if images is None:
            if count:
                raise ValueError(f"the batch holds {count} image tokens (id {self.image_token_id}) but no images")
            return embeddings
        with torch.no_grad() if self.freeze_vision_tower else contextlib.nullcontext():
            pixels = images.pixel_values.to(next(self.vision_model.parameters()).dtype)
            image_embeddings = self.vision_model(pixels, grid_thw=images.image_grid_thw).pooler_output
        if image_embeddings.shape[0] != count:
            raise ValueError(f"the images give {image_embeddings.shape[0]} embeddings for {count} image tokens "
                             f"(id {self.image_token_id}); build prompts and pixels with the same processor")
        by_batch = embeddings.transpose(0, 1)  # [B, S, H]: the order HF's masked_scatter fills
        by_batch = by_batch.masked_scatter(placeholders.unsqueeze(-1), image_embeddings.to(by_batch.dtype))
        return by_batch.transpose(0, 1).contiguous()
