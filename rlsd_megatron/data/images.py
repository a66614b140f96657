"""Images of image+text prompt rows (a vision-language policy, `model.vision`): read, checked,
resized and cut into ViT patches by the model's image processor, and counted in tokens.

The layout is veRL's / EasyR1's: the question text holds one `<image>` placeholder per image, in
reading order, and an `images` column (`data.image_key`) holds the images, each as the dict
Hugging Face `datasets` writes for its Image feature (`{"bytes": ..., "path": ...}`), raw bytes,
or a file path (relative paths are relative to the data file's folder).

The chat template renders each image of a user turn as one image placeholder token (Qwen's
`<|vision_start|><|image_pad|><|vision_end|>`, from a `{"type": "image"}` content item:
`data.teacher_context.hf_chat_renderer`); `expand_image_tokens` then repeats each image's
placeholder token once per vision-tower output embedding (t·h·w / merge² of its patch grid), as
the HF processor does, so student and teacher prompts carry the same images in the same place.

The image processor is transformers' Qwen2-VL one, which Qwen2.5-VL and Qwen3-VL both use (the
PIL backend: the torchvision one is an optional extra), built offline: from the image processor settings saved in
`data.tokenizer_dir` when it has them (`saved_image_processor`: patch size, merge size,
normalisation: the model's own), else from `model.vision`; `data.min_pixels` / `data.max_pixels`
bound the resized image (the authors' recipe: 262144 / 1048576).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from rlsd_megatron.config import DataConfig, VisionConfig

__all__ = ["IMAGE_PLACEHOLDER", "ImageError", "ImageReader", "expand_image_tokens", "image_token_counts"]

IMAGE_PLACEHOLDER = "<image>"


class ImageError(ValueError):
    """An image that cannot be used: unreadable, missing, empty, too large, or miscounted."""


def image_token_counts(image_grid_thw: torch.Tensor, spatial_merge_size: int) -> list[int]:
    """Placeholder tokens of each image [n_images] from its patch grid [n_images, 3] (t, h, w):
    one per merge x merge block of patches."""
    return [int(t * h * w) // spatial_merge_size ** 2 for t, h, w in image_grid_thw.reshape(-1, 3).tolist()]


def expand_image_tokens(ids: Sequence[int], counts: Sequence[int], image_token_id: int) -> list[int]:
    """`ids` with its k-th `image_token_id` repeated `counts[k]` times (a prompt rendered with one
    placeholder per image → the prompt the model reads). Raises ImageError when the prompt holds
    a different number of placeholders than there are images."""
    out: list[int] = []
    image = 0
    for token in ids:
        token = int(token)
        if token != image_token_id:
            out.append(token)
            continue
        if image >= len(counts):
            raise ImageError(f"the rendered prompt holds more image placeholder tokens (id {image_token_id}) than "
                             f"the {len(counts)} image(s) given")
        out.extend([token] * counts[image])
        image += 1
    if image != len(counts):
        raise ImageError(f"the rendered prompt holds {image} image placeholder token(s) (id {image_token_id}) for "
                         f"{len(counts)} image(s); every image needs one {IMAGE_PLACEHOLDER} in the text and the chat "
                         "template must render it as the model's image token")
    return out


@dataclass(frozen=True)
class _Decoded:
    height: int
    width: int
    image: Any  # PIL.Image.Image, RGB


def saved_image_processor(processor_dir: str | None) -> tuple[Path | None, dict]:
    """The image processor settings saved in `processor_dir` and their file, as transformers finds
    them: nested under "image_processor" in `processor_config.json` (what transformers 5 saves),
    else `preprocessor_config.json` (released checkpoints); ({} when neither holds them)."""
    if not processor_dir:
        return None, {}
    nested = Path(processor_dir) / "processor_config.json"
    if nested.is_file():
        settings = json.loads(nested.read_text()).get("image_processor")
        if settings is not None:
            return nested, settings
    legacy = Path(processor_dir) / "preprocessor_config.json"
    return (legacy, json.loads(legacy.read_text())) if legacy.is_file() else (None, {})


class ImageReader:
    """Reads a row's image entries and turns them into model inputs (see the module docstring).

    `check(entries, base_dir)` decodes every image and returns its token count, raising
    ImageError for a bad one; `inputs(entries, base_dir)` gives the `ImageInputs` (pixel patches
    and grids) the learner and the engine consume.
    """

    def __init__(self, vision: VisionConfig, cfg: DataConfig, processor_dir: str | None = None):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        params = {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
                  "merge_size": vision.spatial_merge_size}
        config_file, saved = saved_image_processor(processor_dir)
        params.update({k: saved[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                              "image_std", "rescale_factor") if k in saved})
        if params["merge_size"] != vision.spatial_merge_size or params["patch_size"] != vision.patch_size:
            raise ImageError(f"{config_file}: patch_size={params['patch_size']}, merge_size={params['merge_size']} "
                             f"differ from the model's (model.vision: patch_size={vision.patch_size}, "
                             f"spatial_merge_size={vision.spatial_merge_size}); data.tokenizer_dir must be the model's")
        if not 0 < cfg.min_pixels <= cfg.max_pixels:
            raise ImageError(f"data.min_pixels={cfg.min_pixels} and data.max_pixels={cfg.max_pixels} must satisfy "
                             "0 < min_pixels <= max_pixels (recipe: 262144 and 1048576)")
        self.processor = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, **params)
        self.vision = vision
        self.cfg = cfg
        self.factor = params["patch_size"] * params["merge_size"]

    def _decode(self, entry: Any, base_dir: Path) -> _Decoded:
        from PIL import Image

        if isinstance(entry, dict):
            data, path = entry.get("bytes"), entry.get("path")
        elif isinstance(entry, (bytes, bytearray)):
            data, path = entry, None
        elif isinstance(entry, str):
            data, path = None, entry
        else:
            raise ImageError(f"an image must be bytes, a path or a {{'bytes', 'path'}} dict, got {type(entry).__name__}")
        if data is None and path is None:
            raise ImageError("an image entry has neither bytes nor a path")
        if data is None:
            file = Path(path) if Path(path).is_absolute() else base_dir / path
            if not file.is_file():
                raise ImageError(f"image file {str(file)!r} does not exist")
            data = file.read_bytes()
        if len(data) == 0:
            raise ImageError("an image is zero bytes long")
        limit = self.cfg.max_source_image_pixels
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limit:  # checked before decoding: a decompression bomb is never expanded
                raise ImageError(f"an image is {width}x{height} = {width * height} pixels, over "
                                 f"data.max_source_image_pixels={limit}")
            image.load()
        except ImageError:
            raise
        except Exception as exc:  # PIL's UnidentifiedImageError, truncated data, ...
            raise ImageError(f"an image cannot be read ({type(exc).__name__}: {exc})") from None
        if width == 0 or height == 0:
            raise ImageError(f"an image is {width}x{height} pixels (empty)")
        return _Decoded(height, width, image.convert("RGB"))

    def _grid(self, decoded: _Decoded) -> tuple[int, int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        try:
            height, width = smart_resize(decoded.height, decoded.width, factor=self.factor,
                                         min_pixels=self.cfg.min_pixels, max_pixels=self.cfg.max_pixels)
        except ValueError as exc:  # an aspect ratio over 200
            raise ImageError(f"an image of {decoded.width}x{decoded.height} pixels cannot be resized: {exc}") from None
        patch = self.processor.patch_size
        return 1, height // patch, width // patch

    def check(self, entries: Sequence[Any], base_dir: Path) -> list[int]:
        """Decode every image of a row; its placeholder-token count each. Raises ImageError."""
        grids = torch.tensor([self._grid(self._decode(entry, base_dir)) for entry in entries], dtype=torch.long)
        return image_token_counts(grids, self.vision.spatial_merge_size)

    def inputs(self, entries: Sequence[Any], base_dir: Path):
        """`ImageInputs` of a row's images (pixel patches [patches, C·T·P²], grids [n, 3])."""
        from rlsd_megatron.models.vision_language import ImageInputs

        decoded = [self._decode(entry, base_dir) for entry in entries]
        out = self.processor(images=[d.image for d in decoded], return_tensors="pt")
        grids = out["image_grid_thw"].long()
        want = [self._grid(d) for d in decoded]
        if grids.tolist() != [list(g) for g in want]:
            raise ImageError(f"the image processor gave grids {grids.tolist()}, expected {want}")
        return ImageInputs(out["pixel_values"].float(), grids)
