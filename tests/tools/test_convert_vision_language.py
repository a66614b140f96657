"""HF ⇄ Megatron converters for Qwen2.5-VL and Qwen3-VL (issue 19), in tests/tools/test_convert.py's style.

A tiny random VL model of each type (tests.hf_models; Qwen3-VL's with DeepStack mergers), saved
index-sharded by transformers, is converted for TP=2/PP=2 and loaded by a 4-rank learner at that
layout: on images and text (tests/models/test_vision_language.py's batch) its logits equal
transformers' within 1e-5 (fp32; the parity test's tolerance). The export back is bit-exact,
writes the VL config.json, and transformers loads it into the same model: identical logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlsd_megatron.config import Config, ModelConfig, ParallelConfig
from tests.hf_models import random_hf_vision_language_model
from tests.models.test_vision_language import LOGITS_TOL, MODELS, VL, hf_forward, make_inputs
from tests.tools.test_convert import convert_to_hf, convert_to_megatron, safetensors_state


def logits_with_images(ckpt, model: ModelConfig, tp: int, pp: int):
    """Load `ckpt` into a learner at (tp, pp): full-vocabulary logits per sequence of the VL batch."""
    from megatron.core import parallel_state

    from rlsd_megatron.checkpoint import load_checkpoint
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.learner.vision_batch import vision_micro_batch
    from rlsd_megatron.parallel.state import model_parallel
    from tests.learner.test_parallel_parity import gather_vocab

    sequences, images = make_inputs(model)
    with model_parallel(tp=tp, pp=pp):
        learner = Learner(Config(model=model, parallel=ParallelConfig(tp=tp, pp=pp)))
        load_checkpoint(ckpt, learner.model, model=model)
        mb = vision_micro_batch(sequences, images, model.vision)
        outputs = learner.forward([mb], lambda logits, mb: {"logits": gather_vocab(logits, model.vocab_size)})
        if outputs is None or parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        return [outputs[0]["logits"][i, :len(s)] for i, s in enumerate(sequences)]


@pytest.mark.parametrize("model_type", VL)
def test_vl_checkpoints_convert_at_tp2_pp2_and_back_bit_exact(model_type, dist_pool, tmp_path):
    import transformers

    model = MODELS[model_type]
    hf = random_hf_vision_language_model(model)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    with torch.no_grad():
        want, _, _ = hf_forward(hf, model)
    sequences, _ = make_inputs(model)
    pool = dist_pool(4)
    lines = pool.run(convert_to_megatron, tmp_path / "hf", tmp_path / "megatron", 2, 2)[0]
    assert any("at most 1 held at once" in line for line in lines), lines  # streamed, vision tensors included
    got = next(r for r in pool.run(logits_with_images, tmp_path / "megatron", model, 2, 2) if r)
    for i, seq in enumerate(sequences):
        torch.testing.assert_close(got[i], want[i, :len(seq)], rtol=0, atol=LOGITS_TOL, msg=f"sequence {i}")

    out = tmp_path / "export"
    pool.run(convert_to_hf, tmp_path / "megatron", out, max_shard_size="200KB")
    source, exported = safetensors_state(tmp_path / "hf"), safetensors_state(out)
    assert sorted(exported) == sorted(source) and any("visual." in name for name in source)
    for name in source:
        assert torch.equal(exported[name], source[name]), name
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (model_type, [type(hf).__name__])
    back = getattr(transformers, config["architectures"][0]).from_pretrained(out, attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(hf_forward(back.eval(), model)[0], want)
