"""A Qwen2.5-VL / Qwen3-VL policy on megatron-core: transformers' vision tower feeding a Megatron `GPTModel`.

Design (issue 19):
- **The vision tower is transformers' own** (`Qwen2_5_VisionTransformerPretrainedModel`: patch
  embedding, windowed-attention ViT blocks, patch merger; Qwen3-VL's `Qwen3VLVisionModel`: learned
  position grid, full-attention blocks, merger and DeepStack mergers), run inside the learner on the first
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
  from `models.mrope`; Qwen3-VL's interleaved channel layout by `InterleavedMultimodalRotaryEmbedding`,
  its q/k norm by the qwen3 family's options). `HybridModel` (0.19.2) has no M-RoPE. Subclassing rather than wrapping
  (as `LLaVAModel` wraps a `GPTModel` as `language_model`) keeps every decoder parameter's name
  what it is for text models, so the TP/PP sharding of `models.sharding`, the HF mapping of
  Qwen2 and tied embeddings across PP work unchanged; the vision tower's parameters sit under
  `vision_model.` with HF's names, replicated (no `tensor_model_parallel` attribute).
- **The image embeddings replace the embeddings of the image placeholder tokens** in the
  decoder input (`decoder_input=` of `GPTModel.forward`), in reading order of the batch, as
  HF's `masked_scatter` does. Later stages receive the hidden states through the pipeline as
  for text (`set_input_tensor` is GPTModel's).
- **DeepStack (Qwen3-VL)**: the tower also returns the features of some of its blocks
  (`deepstack_visual_indexes`), which HF adds to the hidden states at the image positions after
  decoder layers 0, 1, ... (one feature each). A forward hook on each of those layers adds them
  (as a dense [S, B, H] tensor, zero off the images, so gradients reach the tower through the
  addition); the features live for one forward. Under PP those layers must all be on the first
  stage, which holds the tower: a layout that puts some later is refused rather than carrying the
  features through the pipeline, because megatron-core's schedules send exactly one activation
  tensor between stages, and the case needs a first stage of fewer layers than DeepStack's (3 of
  Qwen3-VL-8B's 36: a 12-stage pipeline still fits). Full activation recompute is refused too:
  it would rerun the hooked layers in backward after the features are gone (selective is fine).
  Both are refused before the run (`config_checks.deepstack_problems`).
- Checkpointing: the tower is a plain `nn.Module` child, so megatron-core's default
  `sharded_state_dict` saves its tensors as replicated across TP (and exists only on stage 0).
  The HF converters stream it like any other tensor under HF's names (in the files: Qwen2.5-VL's
  transformers-4 names, `vision_config.saved_hf_name`).
- `freeze_vision_tower`: the tower's parameters do not require gradients (Megatron's DDP and
  optimizer then skip them) and it runs without autograd.
- Sequence parallelism: the embedding does not scatter; `embed` fills the image rows of the whole
  [S, B, H] decoder input (and DeepStack's additions) and then scatters each over the TP ranks.
Not yet: context parallelism (the image embeddings would have to follow CP's chunking of every
sequence; CP needs Transformer Engine, GPU only), videos (a sequence holding the video token is
refused). Packed THD micro-batches (Transformer Engine) work as [1, T] rows: `learner.vision_batch`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel

from rlsd_megatron.config import ConfigError, VisionConfig
from rlsd_megatron.models.mrope import InterleavedMultimodalRotaryEmbedding
from rlsd_megatron.models.vision_config import VL_KINDS, build_vision_tower


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
        # The embedding must not scatter the sequence over TP ranks (sequence parallelism) before
        # the image rows are filled in: `embed` scatters the finished decoder input instead.
        super().__init__(position_embedding_type="mrope", scatter_embedding_sequence_parallel=False, **gpt_kwargs)
        if self.config.context_parallel_size > 1:
            raise ConfigError("a vision-language model (model.vision) does not support parallel.cp > 1 yet; turn it off")
        if VL_KINDS[vision.model_type].interleaved_mrope:
            self.rotary_pos_emb = InterleavedMultimodalRotaryEmbedding(
                kv_channels=self.config.kv_channels, rotary_percent=gpt_kwargs.get("rotary_percent", 1.0),
                seq_len_interpolation_factor=gpt_kwargs.get("seq_len_interpolation_factor"),
                rotary_base=gpt_kwargs.get("rotary_base", 10000))
        self.image_token_id = vision.image_token_id
        self.video_token_id = vision.video_token_id
        self.freeze_vision_tower = freeze_vision_tower
        self._deepstack: list[torch.Tensor] | None = None  # this forward's DeepStack additions, [S, B, H] each
        if self.pre_process:
            self.vision_model = build_vision_tower(vision)
            self.vision_model.requires_grad_(not freeze_vision_tower)
            self._hook_deepstack_layers(len(vision.deepstack_visual_indexes))

    def _hook_deepstack_layers(self, count: int) -> None:
        """Have decoder layers 0..count-1 (which must be on this first stage) add DeepStack's features."""
        if not count:
            return
        # config_checks.deepstack_problems refuses these layouts before the run; this guards other callers.
        local = {layer.layer_number - 1: layer for layer in self.decoder.layers}
        if self.config.recompute_granularity == "full" or any(i not in local for i in range(count)):
            raise ConfigError(f"DeepStack needs decoder layers 0..{count - 1} on the first pipeline stage (it holds "
                              f"{sorted(local)}) and no full recompute (got {self.config.recompute_granularity}); "
                              "see config_checks.deepstack_problems")
        for i in range(count):
            local[i].register_forward_hook(functools.partial(self._add_deepstack, i))

    def _add_deepstack(self, index: int, layer, args, output):
        if self._deepstack is None:
            return output
        hidden_states, context = output
        return hidden_states + self._deepstack[index].to(hidden_states.dtype), context

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, *,
                images: ImageInputs | None = None, **kwargs):
        if self.pre_process and decoder_input is None:
            decoder_input, self._deepstack = self.embed(input_ids, images)
        try:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input, **kwargs)
        finally:
            self._deepstack = None

    def embed(self, input_ids: torch.Tensor,
              images: ImageInputs | None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Decoder input [S, B, H]: token embeddings, with the image placeholders' rows replaced
        by the vision tower's embeddings of `images` (batch-major reading order); and DeepStack's
        additions after decoder layers 0, 1, ... ([S, B, H] each, zero off the images; None: none)."""
        if self.video_token_id is not None and bool((input_ids == self.video_token_id).any()):
            raise ValueError(f"the batch holds video tokens (id {self.video_token_id}); videos are not supported, "
                             "only still images")
        embeddings = self.embedding(input_ids=input_ids, position_ids=None)
        placeholders = input_ids == self.image_token_id  # [B, S]
        count = int(placeholders.sum())
        if images is None:
            if count:
                raise ValueError(f"the batch holds {count} image tokens (id {self.image_token_id}) but no images")
            return self._scatter_sequence(embeddings), None
        with torch.no_grad() if self.freeze_vision_tower else contextlib.nullcontext():
            pixels = images.pixel_values.to(next(self.vision_model.parameters()).dtype)
            out = self.vision_model(pixels, grid_thw=images.image_grid_thw)
        if out.pooler_output.shape[0] != count:
            raise ValueError(f"the images give {out.pooler_output.shape[0]} embeddings for {count} image tokens "
                             f"(id {self.image_token_id}); build prompts and pixels with the same processor")
        mask = placeholders.unsqueeze(-1)

        def scatter(onto: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            by_batch = onto.transpose(0, 1)  # [B, S, H]: the order HF's masked_scatter fills
            return by_batch.masked_scatter(mask, rows.to(by_batch.dtype)).transpose(0, 1).contiguous()

        deepstack = [self._scatter_sequence(scatter(torch.zeros_like(embeddings), features))
                     for features in getattr(out, "deepstack_features", None) or []]
        return self._scatter_sequence(scatter(embeddings, out.pooler_output)), deepstack or None

    def _scatter_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, B, H] → this TP rank's [S/TP, B, H] slice under sequence parallelism (else `hidden`).
        Its backward all-gathers the gradient, so every TP rank's tower replica receives the whole
        image gradient and the replicas stay identical without a reduction of their own."""
        if not self.config.sequence_parallel:
            return hidden
        return tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=self.pg_collection.tp)
