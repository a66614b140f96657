"""A Qwen3-VL policy on the SGLang backend (GPU; `pytest -m gpu` on an H100/H200 with
`pip install -e .[gpu]`): a tiny random Qwen3-VL (built from a config, no download) in a Megatron
learner, its weights synced into our SGLang engine (vision tower, merger, DeepStack mergers and
language model), generation with images through the engine, and the learner's log-probs of the
generated tokens with the same images against SGLang's, within the bf16 tolerance the text models
use (`test_sglang_gpu.BF16_LOGPROB_TOL`). The images steer the engine: another picture in the same
prompt changes its log-probs by far more than that tolerance (the images arrived and the vision
weights with them).

Every engine runs inside a `gpu_pool` worker (see `test_sglang_gpu`).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from rlsd_megatron.config import Config, DataConfig, ModelConfig, PrecisionConfig
from rlsd_megatron.rollout import MismatchMonitor, SamplingParams
from tests.rollout.test_sglang_gpu import BF16_LOGPROB_TOL, allow_children

pytestmark = pytest.mark.gpu

PIXELS = DataConfig(min_pixels=32 * 32, max_pixels=128 * 128)


def vl_model(tokenizer) -> ModelConfig:
    """Qwen3-VL with head dims of 64 (decoder and ViT) and a vocabulary SGLang's kernels accept;
    interleaved M-RoPE 12/10/10 of 32 pairs; DeepStack after decoder layers 0 and 1."""
    from rlsd_megatron.config import VisionConfig

    vision = VisionConfig(model_type="qwen3_vl", depth=2, hidden_size=128, intermediate_size=256, num_heads=2,
                          out_hidden_size=256, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                          hidden_act="gelu_pytorch_tanh", num_position_embeddings=16, deepstack_visual_indexes=[0, 1],
                          image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                          video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"), mrope_section=[12, 10, 10])
    return ModelConfig(family="qwen3", vocab_size=512, hidden_size=256, num_layers=4, num_attention_heads=4,
                       num_query_groups=2, kv_channels=64, ffn_hidden_size=512, qk_layernorm=True,
                       rope_theta=1000000.0, max_position_embeddings=1024, vision=vision)


def processor_dir(root: str) -> str:
    """A Qwen3-VL processor directory (tokenizer + image and video processors), saved offline."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    from rlsd_megatron.data import load_chat_tokenizer
    from tests.data.conftest import VL_CHAT_TEMPLATE, VL_SPECIAL_TOKENS, build_tokenizer

    directory = build_tokenizer(f"{root}/processor", chat_template=VL_CHAT_TEMPLATE,
                                extra_special_tokens=VL_SPECIAL_TOKENS + ("<|video_pad|>",))
    sizes = dict(patch_size=16, temporal_patch_size=2, merge_size=2)
    images = Qwen2VLImageProcessor(**sizes)
    Qwen3VLProcessor(image_processor=images, video_processor=Qwen3VLVideoProcessor(**sizes),
                     tokenizer=load_chat_tokenizer(directory)).save_pretrained(str(directory))
    images.save_pretrained(str(directory))  # preprocessor_config.json, which our ImageReader reads
    return str(directory)


def png(height: int, width: int, seed: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")).save(out, "PNG")
    return out.getvalue()


def prompts_and_images(tokenizer, reader, root):
    """Two prompts with one and two images (rendered as Qwen's template does), one text prompt."""
    from pathlib import Path

    from rlsd_megatron.data.images import expand_image_tokens

    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows = [("Add <image> and 1.", [png(64, 96, 1)]), ("Compare <image> with <image>.", [png(96, 64, 2), png(64, 64, 3)]),
            ("What is 1+1?", [])]
    prompts, images = [], []
    for text, pictures in rows:
        ids = tokenizer(text.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>"))["input_ids"]
        counts = reader.check(pictures, Path(root)) if pictures else []
        prompts.append(expand_image_tokens(ids, counts, image_id))
        images.append(reader.inputs(pictures, Path(root)) if pictures else None)
    return prompts, images


def learner_to_sglang_with_images(root: str) -> dict:
    import torch.distributed as dist

    from rlsd_megatron.data import load_chat_tokenizer
    from rlsd_megatron.data.images import ImageReader
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.models.hf_mapping import hf_to_megatron
    from rlsd_megatron.ops import token_log_probs
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.rollout import sync_weights
    from rlsd_megatron.rollout.sglang_engine import SGLangEngine
    from tests.hf_models import random_hf_vision_language_model

    allow_children()
    processor = processor_dir(root)
    tokenizer = load_chat_tokenizer(processor)
    model = vl_model(tokenizer)
    reader = ImageReader(model.vision, PIXELS, processor)
    prompts, images = prompts_and_images(tokenizer, reader, root)
    hf = random_hf_vision_language_model(model, seed=0)
    full = {k: v.float() for k, v in hf_to_megatron(dict(hf.state_dict()).__getitem__, model)}
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=2)
    with model_parallel():
        learner = Learner(Config(model=model, precision=PrecisionConfig(params_dtype="bf16")))
        learner.load_full_state(full)
        engine = SGLangEngine(model, engine_tp=1, mem_fraction_static=0.3, dtype="bfloat16", processor_path=processor,
                              server_args={"disable_cuda_graph": True})
        try:
            sync_weights(learner.model, model, engine, version=1, bucket_bytes=2**20)
            generations = engine.generate(prompts, sampling, images=images)
            swapped = [images[1], images[0].__class__(images[1].pixel_values.flip(0), images[1].image_grid_thw)]
            other = engine.generate(prompts[1:2] * 2, SamplingParams(n=1, temperature=0.0, max_new_tokens=4),
                                    images=swapped)
        finally:
            engine.shutdown()
        sequences = [torch.tensor(prompts[g.prompt_index] + g.token_ids) for g in generations]
        per_seq = learner.forward_sequences(sequences, lambda logits, m: {
            "logp": token_log_probs(logits, m.targets.to(logits.device), vocab_size=model.vocab_size)},
            images=[images[g.prompt_index] for g in generations])["logp"]
    learner_lp = torch.cat([lp[len(prompts[g.prompt_index]):] for lp, g in zip(per_seq, generations)])
    engine_lp = torch.cat([torch.tensor(g.log_probs) for g in generations])
    mismatch = MismatchMonitor(max_mean=BF16_LOGPROB_TOL).check(learner_lp, engine_lp, version=1)
    dist.barrier()
    return {"mismatch": mismatch, "tokens": [g.token_ids for g in generations],
            "image_effect": max(abs(a - b) for a, b in zip(other[0].log_probs, other[1].log_probs))
            if other[0].token_ids[:1] == other[1].token_ids[:1] else float("inf"),
            "image_id": model.vision.image_token_id, "video_id": model.vision.video_token_id}


def test_vl_learner_to_sglang_log_prob_parity(gpu_pool, tmp_path):
    pytest.importorskip("sglang", reason="needs the [gpu] extra (pip install -e .[gpu])")
    result = gpu_pool(1).run(learner_to_sglang_with_images, str(tmp_path), timeout=900)[0]
    assert len(result["tokens"]) == 12
    assert all(result["image_id"] not in t and result["video_id"] not in t for t in result["tokens"])
    assert result["mismatch"].tokens > 0 and result["mismatch"].mean_abs < BF16_LOGPROB_TOL, result["mismatch"]
    assert result["image_effect"] > 10 * BF16_LOGPROB_TOL, result["image_effect"]
