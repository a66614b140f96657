"""Image+text prompt rows (veRL / EasyR1 parquet layout) for a vision-language policy: token ids
with one placeholder token per image embedding, pixel patches as transformers' processor gives
them, the min / max pixel bounds, every bad-image kind in both bad-row modes, and the teacher
context carrying the student's images."""

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlsd_megatron.config import DataConfig
from rlsd_megatron.data import DataError, FilePromptDataset, MATH_STUDENT_TEMPLATE
from tests.data.conftest import build_vl_tokenizer
from tests.hf_models import tiny_vision_language_model

# Tiny images for a ViT of 4-pixel patches merged 2x2 (8-pixel units): 16x24 → a 4x6 patch grid.
PIXELS = dict(min_pixels=64, max_pixels=4096)


@pytest.fixture(scope="module")
def vl_tokenizer(tmp_path_factory):
    from rlsd_megatron.data import load_chat_tokenizer

    return load_chat_tokenizer(build_vl_tokenizer(tmp_path_factory.mktemp("vl_tokenizer")))


@pytest.fixture(scope="module")
def vision(vl_tokenizer):
    image_token = vl_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return dataclasses.replace(tiny_vision_language_model().vision, image_token_id=image_token)


def png(height: int, width: int, seed: int = 0, mode: str = "RGB") -> bytes:
    from PIL import Image

    rgb = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(out, format="PNG")
    return out.getvalue()


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def reference(tokenizer, vision, question: str, images: list[bytes]):
    """Independent of the dataset: transformers' processor on the images, the chat template on a
    content list, each image pad token repeated t·h·w/4 times (what Qwen2VLProcessor does)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, **PIXELS)
    out = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")
    text = MATH_STUDENT_TEMPLATE.format(question=question)
    pieces = text.split("<image>")
    content = [{"type": "text", "text": pieces[0]}]
    for piece in pieces[1:]:
        content += [{"type": "image"}, {"type": "text", "text": piece}]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    counts = iter([int(g.prod()) // 4 for g in out["image_grid_thw"]])
    pad = "<|image_pad|>"
    rendered = "".join(piece + (pad * next(counts) if i < rendered.count(pad) else "")
                       for i, piece in enumerate(rendered.split(pad)))
    return tokenizer.encode(rendered, add_special_tokens=False), out["pixel_values"], out["image_grid_thw"]


def test_parquet_rows_with_images(tmp_path, vl_tokenizer, vision):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "c.png").write_bytes(png(24, 16, seed=3))
    a, b = png(16, 24, seed=1), png(40, 40, seed=2, mode="L")  # a grey image is converted to RGB
    rows = [
        {"question": "Compare <image> with <image>.", "answer": "2", "images": [{"bytes": a, "path": None},
                                                                               {"bytes": b, "path": None}]},
        {"question": "What is 1+1?", "answer": "2", "images": []},
        {"question": "<image> What is shown?", "answer": "3", "images": [{"bytes": None, "path": "pics/c.png"}]},
    ]
    path = write_parquet(tmp_path / "train.parquet", rows)
    dataset = FilePromptDataset([str(path)], DataConfig(**PIXELS), vl_tokenizer, vision=vision)
    assert dataset.stats["rows"] == 3 and dataset.stats["skipped"] == 0
    for i, images in ((0, [a, b]), (2, [(tmp_path / "pics" / "c.png").read_bytes()])):
        row = dataset[i]
        ids, pixels, grids = reference(vl_tokenizer, vision, rows[i]["question"], images)
        assert row.prompt_ids == ids
        torch.testing.assert_close(row.images.pixel_values, pixels, rtol=0, atol=0)
        assert row.images.image_grid_thw.tolist() == grids.tolist()
        assert sum(t == vision.image_token_id for t in row.prompt_ids) == int(grids.prod(-1).sum()) // 4
    assert dataset[0].images.image_grid_thw.tolist() == [[1, 4, 6], [1, 10, 10]]
    text_row = dataset[1]
    assert text_row.images is None and vision.image_token_id not in text_row.prompt_ids


def test_min_and_max_pixels_bound_the_resized_image(tmp_path, vl_tokenizer, vision):
    rows = [{"question": "<image>", "answer": "1", "images": [png(200, 120, seed=4)]},
            {"question": "<image>", "answer": "1", "images": [png(4, 6, seed=5)]}]
    path = write_parquet(tmp_path / "train.parquet", rows)
    dataset = FilePromptDataset([str(path)], DataConfig(min_pixels=1024, max_pixels=2048), vl_tokenizer,
                                vision=vision)
    for i in range(2):
        t, h, w = dataset[i].images.image_grid_thw[0].tolist()
        assert 1024 <= h * w * 16 <= 2048, (i, h, w)  # 16 = pixels per 4x4 patch


BAD = {
    "unreadable": ({"bytes": b"not an image at all", "path": None}, "bad_image", "cannot be read"),
    "missing": ({"bytes": None, "path": "nowhere.png"}, "bad_image", "does not exist"),
    "zero_size": ({"bytes": b"", "path": None}, "bad_image", "zero bytes"),
    "too_many_pixels": ({"bytes": png(64, 64), "path": None}, "bad_image", "over data.max_source_image_pixels=1000"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_image_is_a_bad_row(tmp_path, vl_tokenizer, vision, case):
    entry, kind, message = BAD[case]
    rows = [{"question": "<image> ok", "answer": "1", "images": [{"bytes": png(16, 16), "path": None}]},
            {"question": "<image> bad", "answer": "1", "images": [entry]}]
    path = write_parquet(tmp_path / "train.parquet", rows)
    cfg = DataConfig(max_source_image_pixels=1000, **PIXELS)
    with pytest.raises(DataError, match=f"row 2: .*{message}.*data.bad_rows=skip"):
        FilePromptDataset([str(path)], cfg, vl_tokenizer, vision=vision)
    dataset = FilePromptDataset([str(path)], dataclasses.replace(cfg, bad_rows="skip"), vl_tokenizer, vision=vision)
    assert len(dataset) == 1 and dataset.stats[f"skipped_{kind}"] == 1 and dataset.stats["skipped"] == 1


def test_placeholder_count_must_match_images(tmp_path, vl_tokenizer, vision):
    rows = [{"question": "<image> and <image>", "answer": "1", "images": [png(16, 16)]},
            {"question": "no placeholder", "answer": "1", "images": [png(16, 16)]},
            {"question": "<image> fine", "answer": "1", "images": [png(16, 16)]}]
    path = write_parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(DataError, match="row 1: the question holds 2 <image> placeholder.* holds 1 image"):
        FilePromptDataset([str(path)], DataConfig(**PIXELS), vl_tokenizer, vision=vision)
    dataset = FilePromptDataset([str(path)], DataConfig(bad_rows="skip", **PIXELS), vl_tokenizer, vision=vision)
    assert len(dataset) == 1 and dataset.stats["skipped_image_count"] == 2


def test_teacher_context_carries_the_images(tmp_path, vl_tokenizer, vision):
    """RLSD's and SDPO's teacher prompts hold the student's images at the question's place, each
    expanded to as many tokens as in the student prompt, the hint after them in the user turn."""
    rows = [{"question": "Look: <image> what number?", "answer": "42", "images": [png(16, 24, seed=7)]}]
    path = write_parquet(tmp_path / "train.parquet", rows)
    dataset = FilePromptDataset([str(path)], DataConfig(**PIXELS), vl_tokenizer, vision=vision)
    row = dataset[0]
    response = vl_tokenizer.encode("<answer> 42 </answer>", add_special_tokens=False)
    image_tokens = sum(t == vision.image_token_id for t in row.prompt_ids)
    assert image_tokens == 6
    for seq in (dataset.teacher_context.build(row.question, row.answer, response, images=row.images),
                dataset.teacher_context.build_sdpo(row.question, response, solution="<answer> 42 </answer>",
                                                   images=row.images)):
        prompt = seq.input_ids[:seq.response_start]
        assert seq.images is row.images and seq.input_ids[seq.response_start:] == response
        positions = [i for i, t in enumerate(prompt) if t == vision.image_token_id]
        assert len(positions) == image_tokens and positions == list(range(positions[0], positions[0] + 6))
        text = vl_tokenizer.decode(prompt)
        assert text.index("<|vision_end|>") < text.index("42") < text.rindex("<|im_start|>assistant")
    with pytest.raises(ValueError, match="1 image"):
        dataset.teacher_context.build("no placeholder here", "42", response, images=row.images)


@pytest.mark.parametrize("layout", ["processor_config", "preprocessor_config"])
def test_image_settings_are_read_from_both_saved_layouts(tmp_path, vision, layout):
    """The model directory's image normalisation reaches the processor whether it is nested in
    processor_config.json (transformers 5's ProcessorMixin.save_pretrained; that needs torchvision
    for the video processor, so here the nesting is written from the image processor's own file) or
    a released checkpoint's flat preprocessor_config.json; transformers' own loader reads each
    directory to the same settings."""
    import json

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from rlsd_megatron.data.images import ImageReader, saved_image_processor

    saved = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, image_mean=[0.1, 0.2, 0.3],
                                     image_std=[0.5, 0.5, 0.5])
    saved.save_pretrained(tmp_path)  # preprocessor_config.json
    if layout == "processor_config":
        flat = tmp_path / "preprocessor_config.json"
        (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": json.loads(flat.read_text())}))
        flat.unlink()
    file, settings = saved_image_processor(str(tmp_path))
    assert file.name == f"{layout}.json" and settings["image_mean"] == [0.1, 0.2, 0.3]
    assert list(Qwen2VLImageProcessorPil.from_pretrained(tmp_path).image_mean) == [0.1, 0.2, 0.3]
    reader = ImageReader(vision, DataConfig(**PIXELS), processor_dir=str(tmp_path))
    assert list(reader.processor.image_mean) == [0.1, 0.2, 0.3]
    assert saved_image_processor(str(tmp_path / "missing")) == (None, {})
