"""Qwen2.5-VL and Qwen3-VL on the Megatron learner against transformers' own models (issue 19).

Every test runs for both model types (`VL`, parametrised). A tiny random model (tests.hf_models;
Qwen3-VL's with interleaved M-RoPE, q/k norm and DeepStack into decoder layers 0 and 1) and three sequences: two images inside one sequence,
one image in another, a text-only one, right-padded in one batch (one image through transformers'
image processor, the others random patches). Our learner, loaded from the HF
state dict through the HF ⇄ Megatron mapping, must give transformers' logits, loss and the
gradient of every HF tensor (vision tower included) at TP=1, TP=2 and PP=2, in fp32:
logits and loss within 1e-5 absolute (values of order 1), gradients within 1e-5 relative to the
tensor's largest entry (the attention kernels and summation orders differ: Megatron's local
attention vs HF's eager, TP's split reductions).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rlsd_megatron.config import Config, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from tests.hf_models import random_hf_vision_language_model, tiny_vision_language_model
from tests.learner.test_parallel_parity import gather_vocab, nll_loss_fn

LOGITS_TOL = 1e-5
GRAD_TOL = 1e-5
VL = ["qwen2_5_vl", "qwen3_vl"]
MODELS = {model_type: tiny_vision_language_model(model_type) for model_type in VL}
GRIDS = [(1, 4, 6), (1, 8, 4), (1, 6, 4)]  # (t, h, w) ViT patches: 6, 8 and 6 image tokens


def make_inputs(model: ModelConfig) -> tuple[list[torch.Tensor], list]:
    """Three token sequences with their images (`ImageInputs` or None), as the processor lays them out."""
    from rlsd_megatron.models.vision_language import ImageInputs

    vision = model.vision
    gen = torch.Generator().manual_seed(3)
    patch_width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2

    def text(n):
        return torch.randint(0, 90, (n,), generator=gen)

    def image(grid):
        t, h, w = grid
        tokens = torch.full((t * h * w // vision.spatial_merge_size ** 2,), vision.image_token_id)
        pixels = torch.randn(t * h * w, patch_width, generator=gen)
        return tokens, pixels

    (a_tokens, _), (b_tokens, b_pixels), (c_tokens, c_pixels) = (image(g) for g in GRIDS)
    a_pixels = processed_image(vision, height=16, width=24, grid=GRIDS[0])
    sequences = [
        torch.cat([text(4), a_tokens, text(3), b_tokens, text(2)]),
        torch.cat([text(3), c_tokens, text(5)]),
        text(9),
    ]
    images = [
        ImageInputs(torch.cat([a_pixels, b_pixels]), torch.tensor(GRIDS[:2])),
        ImageInputs(c_pixels, torch.tensor(GRIDS[2:])),
        None,
    ]
    return sequences, images


def processed_image(vision, *, height: int, width: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Pixel patches of a random in-memory RGB image through transformers' Qwen2-VL image processor
    (the one Qwen2.5-VL uses: resize to multiples of patch·merge, normalise, cut into patches)."""
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                         merge_size=vision.spatial_merge_size, min_pixels=64, max_pixels=4096)
    rgb = (np.random.RandomState(1).rand(height, width, 3) * 255).astype("uint8")
    out = processor(images=[Image.fromarray(rgb)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [list(grid)]
    return out["pixel_values"]


def hf_forward(hf, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' logits [B, S, V] on the right-padded batch of `make_inputs(model)`, with its
    input ids and attention mask [B, S]."""
    sequences, images = make_inputs(model)
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, seq in enumerate(sequences):
        input_ids[i, :len(seq)] = seq
        attention_mask[i, :len(seq)] = 1
    present = [x for x in images if x is not None]
    logits = hf(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=(input_ids == model.vision.image_token_id).int(),
        pixel_values=torch.cat([x.pixel_values for x in present]),
        image_grid_thw=torch.cat([x.image_grid_thw for x in present]),
    ).logits
    return logits, input_ids, attention_mask


def hf_reference(model: ModelConfig) -> dict:
    """transformers' logits per sequence, token-mean NLL and every gradient, on the padded batch."""
    hf = random_hf_vision_language_model(model)
    sequences, _ = make_inputs(model)
    logits, input_ids, attention_mask = hf_forward(hf, model)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    mask = attention_mask[:, 1:].bool()
    loss = (nll * mask).sum() / mask.sum()
    loss.backward()
    return {
        "model": model,
        "state": {name: t.detach().clone() for name, t in hf.state_dict().items()},
        "logits": [logits[i, :len(s)].detach() for i, s in enumerate(sequences)],
        "loss": loss.item(),
        "grads": {name: p.grad.clone() for name, p in hf.named_parameters()},
    }


def run_learner(model: ModelConfig, hf_state: dict, tp: int, pp: int, sp: bool = False, impl: str = "local",
                packed: bool = False, vpp: int | None = None, split: list[list[int]] | None = None) -> dict:
    """Our learner of `model` at (tp, pp, vpp), sequence parallel if `sp`, with `impl` layers loaded
    from `hf_state` (packed THD micro-batches if `packed`: Transformer Engine only), the sequences
    in the micro-batches of `split` (default: 0 and 2, then 1): logits per sequence, loss and every
    gradient under HF names (on every rank), what the step updated."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.learner.vision_batch import vision_micro_batch
    from rlsd_megatron.models.hf_mapping import hf_to_megatron, megatron_to_hf
    from rlsd_megatron.parallel.state import model_parallel

    cfg = Config(model=model, parallel=ParallelConfig(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sp,
                                                      use_distributed_optimizer=False),
                 optimizer=OptimizerConfig(lr=1e-3, clip_grad=0.0), train=TrainConfig(steps=10))
    vocab = model.vocab_size
    sequences, images = make_inputs(model)
    # Two micro-batches by default (gradient accumulation): sequences 0 and 2, then 1.
    split = split or [[0, 2], [1]]
    with model_parallel(tp=tp, pp=pp, vpp=vpp):
        learner = Learner(cfg, impl=impl)
        learner.load_full_state(dict(hf_to_megatron(hf_state.__getitem__, model)))
        before = learner.full_state()
        micro_batches = [vision_micro_batch([sequences[i] for i in idx], [images[i] for i in idx], model.vision,
                                            pad_to_multiple=tp if sp else 1, packed=packed) for idx in split]
        outputs = learner.forward(micro_batches, lambda logits, mb: {"logits": gather_vocab(logits, vocab)})
        total = sum(len(s) - 1 for s in sequences)
        stats = learner.train_step(micro_batches, nll_loss_fn(vocab, total))
        loss = torch.tensor(stats.get("loss", 0.0) if parallel_state.get_tensor_model_parallel_rank() == 0 else 0.0,
                            dtype=torch.float64)
        dist.all_reduce(loss)
        grads = learner.full_state(grads=True)
        after = learner.full_state()
        # The tower is replicated over TP: every TP rank must hold the same gradient (full_state reads rank 0's).
        local = {name: p.main_grad.clone() for name, p in learner.named_parameters() if name.startswith("vision_model.")}
        replicas = [None] * parallel_state.get_tensor_model_parallel_world_size()
        dist.all_gather_object(replicas, local, group=parallel_state.get_tensor_model_parallel_group())
        for replica in replicas[1:]:
            for name, grad in replica.items():
                torch.testing.assert_close(grad, local[name], rtol=0, atol=0, msg=f"{name} differs across TP ranks")
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, outputs)
    outputs = next(o for o in per_rank if o is not None)
    logits = {}
    for idx, out, mb in zip(split, outputs, micro_batches):
        for row, i in enumerate(idx):
            at, start = (0, mb.offsets[row]) if packed else (row, 0)
            logits[i] = out["logits"][at, start:start + len(sequences[i])].cpu()
    hf_grads = {}
    for name, grad in grads.items():
        hf_grads.update(megatron_to_hf(name, grad, model))
    updated = {name for name in before if not torch.equal(before[name], after[name])}
    return {"logits": [logits[i] for i in range(len(sequences))], "loss": float(loss), "grads": hf_grads,
            "updated": updated, "names": set(before)}


def run_layouts(model: ModelConfig, hf_state: dict, layouts: list[tuple[int, int]]) -> dict:
    return {layout: run_learner(model, hf_state, *layout) for layout in layouts}


@pytest.fixture(scope="module", params=VL)
def reference(request):
    return hf_reference(MODELS[request.param])


def assert_matches_hf(case: dict, ref: dict) -> None:
    for i, (got, want) in enumerate(zip(case["logits"], ref["logits"])):
        torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_TOL, msg=f"logits of sequence {i}")
    assert case["loss"] == pytest.approx(ref["loss"], abs=LOGITS_TOL)
    tied = {"lm_head.weight"} if ref["model"].tie_word_embeddings else set()
    assert set(case["grads"]) == set(ref["grads"]) - tied
    assert any(name.startswith("model.visual.") for name in case["grads"])
    for name, want in ref["grads"].items():
        if name in tied:
            continue
        scale = want.abs().max()
        assert scale > 0, f"{name}: HF gradient is zero, the comparison would prove nothing"
        diff = (case["grads"][name] - want).abs().max() / scale
        assert diff < GRAD_TOL, f"grad {name}: relative diff {diff:.2e}"
    assert case["updated"] == case["names"], f"not updated by the step: {sorted(case['names'] - case['updated'])}"


def test_mrope_positions_match_transformers(reference):
    """`models.mrope` against transformers' `get_rope_index` on the padded batch."""
    from rlsd_megatron.learner.vision_batch import vision_micro_batch

    model = reference["model"]
    hf = random_hf_vision_language_model(model)
    sequences, images = make_inputs(model)
    mb = vision_micro_batch(sequences, images, model.vision)
    attention_mask = torch.zeros_like(mb.tokens)
    for i, seq in enumerate(sequences):
        attention_mask[i, :len(seq)] = 1
    want, _ = hf.model.get_rope_index(mb.tokens, (mb.tokens == model.vision.image_token_id).int(),
                                      image_grid_thw=mb.images.image_grid_thw, attention_mask=attention_mask)
    mask = attention_mask.bool().expand(3, -1, -1)
    assert torch.equal(mb.position_ids[mask], want[mask])
    # The second image of sequence 0 starts after the first image's max(h, w)/2 = 3 positions and 3 text tokens.
    assert mb.position_ids[:, 0, 4 + 6 + 3].tolist() == [4 + 3 + 3] * 3


def test_packed_rows_hold_each_sequence_with_its_padded_positions_and_images():
    """A packed THD row (Transformer Engine's layout) holds, at each sequence's offset, the tokens,
    targets and M-RoPE positions of the padded batch's row, and the same images in the same order."""
    from rlsd_megatron.learner.vision_batch import vision_micro_batch

    model = MODELS["qwen3_vl"]
    sequences, images = make_inputs(model)
    padded = vision_micro_batch(sequences, images, model.vision)
    packed = vision_micro_batch(sequences, images, model.vision, packed=True, pad_to_multiple=4,
                                pad_total_to_multiple=8)
    assert packed.tokens.shape[0] == 1 and packed.tokens.shape[1] % 8 == 0 and packed.position_ids.shape[:2] == (3, 1)
    assert packed.packed_seq_params.cu_seqlens_q_padded[-1] == packed.tokens.shape[1]  # THD rotary's "packed freqs"
    for i, (seq, start) in enumerate(zip(sequences, packed.offsets)):
        n = len(seq)
        assert torch.equal(packed.tokens[0, start:start + n], padded.tokens[i, :n])
        assert torch.equal(packed.targets[0, start:start + n], padded.targets[i, :n])
        assert torch.equal(packed.position_ids[:, 0, start:start + n], padded.position_ids[:, i, :n])
    assert packed.position_ids[:, 0, packed.offsets[1]:].max() > 0  # later sequences keep their own positions
    assert torch.equal(packed.images.pixel_values, padded.images.pixel_values)
    assert torch.equal(packed.images.image_grid_thw, padded.images.image_grid_thw)


def test_mrope_rejects_image_tokens_without_grid():
    from rlsd_megatron.models.mrope import mrope_position_ids

    tokens = torch.tensor([1, 96, 96, 2])
    with pytest.raises(ValueError, match="needs 4 consecutive image tokens"):
        mrope_position_ids(tokens, torch.tensor([[1, 4, 4]]), image_token_id=96, spatial_merge_size=2)


@pytest.mark.parametrize("model_type", VL)
def test_hf_config_round_trip(tmp_path, model_type):
    """A VL config.json written by transformers reads back into the same ModelConfig."""
    from rlsd_megatron.config import load_config

    model = MODELS[model_type]
    hf = random_hf_vision_language_model(model)
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    cfg = load_config(None, [f"model.hf_config={tmp_path}", "model.freeze_vision_tower=true"])
    assert cfg.model.vision == model.vision
    assert ModelConfig(**{**vars(cfg.model), "hf_config": None, "freeze_vision_tower": False}) == model


QWEN3_VL_8B_CONFIG = {  # Qwen/Qwen3-VL-8B-Instruct's config.json (transformers 4.57 layout), keys we read
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
    "video_token_id": 151656, "tie_word_embeddings": False,
    "text_config": {"model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 36,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "intermediate_size": 12288, "hidden_act": "silu", "max_position_embeddings": 262144,
                    "rms_norm_eps": 1e-6, "rope_theta": 5000000, "attention_bias": False,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}},
    "vision_config": {"model_type": "qwen3_vl", "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh",
                      "intermediate_size": 4304, "num_heads": 16, "in_channels": 3, "patch_size": 16,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 4096,
                      "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
}


def test_qwen3_vl_8b_config_reads():
    """The paper's model's config.json: a Qwen3 decoder (q/k norm, head dim 128, GQA 8) with
    interleaved M-RoPE 24/20/20 and three DeepStack features; a chunked-M-RoPE claim is refused."""
    from rlsd_megatron.config import ConfigError
    from rlsd_megatron.models.hf_config import model_fields_from_hf

    model = ModelConfig(**model_fields_from_hf(QWEN3_VL_8B_CONFIG))
    assert (model.family, model.num_layers, model.kv_channels, model.num_query_groups) == ("qwen3", 36, 128, 8)
    assert model.qk_layernorm and not model.qkv_bias and model.rope_theta == 5000000
    vision = model.vision
    assert (vision.model_type, vision.mrope_section, vision.deepstack_visual_indexes) == ("qwen3_vl", [24, 20, 20],
                                                                                          [8, 16, 24])
    assert (vision.depth, vision.num_position_embeddings, vision.video_token_id) == (27, 2304, 151656)
    bad = json.loads(json.dumps(QWEN3_VL_8B_CONFIG))
    bad["text_config"]["rope_scaling"]["mrope_interleaved"] = False
    with pytest.raises(ConfigError, match="mrope_interleaved=False"):
        model_fields_from_hf(bad)


def test_interleaved_mrope_matches_transformers(monkeypatch):
    """Our interleaved M-RoPE angles against transformers' Qwen3-VL text rotary embedding, on
    positions whose three axes all differ (Qwen3-VL-8B's head dim 128 and sections 24/20/20)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # megatron-core places inv_freq there
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from rlsd_megatron.models.mrope import InterleavedMultimodalRotaryEmbedding

    section = [24, 20, 20]
    hf = Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(
        hidden_size=256, num_attention_heads=2, head_dim=128,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": section}))
    ours = InterleavedMultimodalRotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=5000000)
    positions = torch.randint(0, 500, (3, 2, 7), generator=torch.Generator().manual_seed(0))
    cos, _ = hf(torch.zeros(1, dtype=torch.float32), positions)  # [B, S, 128]
    angles = ours(positions, section)  # [S, B, 1, 128]
    torch.testing.assert_close(angles.squeeze(2).transpose(0, 1).cos(), cos, rtol=0, atol=1e-6)
    # megatron-core's own (chunked) layout differs on these positions: the comparison can fail.
    chunked = MultimodalRotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=5000000)
    assert not torch.allclose(chunked(positions, section).squeeze(2).transpose(0, 1).cos(), cos, atol=1e-3)


def run_frozen(model: ModelConfig, hf_state: dict) -> dict:
    """One train step at TP=1 with `freeze_vision_tower`: logits per sequence, which weights the
    step changed, and whether any vision parameter wants gradients or sits in the optimizer."""
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.learner.vision_batch import vision_micro_batch
    from rlsd_megatron.models.hf_mapping import hf_to_megatron
    from rlsd_megatron.parallel.state import model_parallel

    model = dataclasses.replace(model, freeze_vision_tower=True)
    cfg = Config(model=model, optimizer=OptimizerConfig(lr=1e-3), train=TrainConfig(steps=10))
    sequences, images = make_inputs(model)
    with model_parallel():
        learner = Learner(cfg)
        learner.load_full_state(dict(hf_to_megatron(hf_state.__getitem__, model)))
        before = learner.full_state()
        mb = vision_micro_batch(sequences, images, model.vision)
        out = learner.forward([mb], lambda logits, mb: {"logits": logits[..., :model.vocab_size]})[0]
        learner.train_step([mb], nll_loss_fn(model.vocab_size, sum(len(s) - 1 for s in sequences)))
        after = learner.full_state()
        video = vision_micro_batch([torch.tensor([3, model.vision.video_token_id, 4])], [None], model.vision)
        try:
            learner.forward([video], lambda logits, mb: {})
            video_error = None
        except ValueError as exc:
            video_error = str(exc)
        vision = [p for name, p in learner.named_parameters() if name.startswith("vision_model.")]
        in_optimizer = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
        return {
            "logits": [out["logits"][i, :len(s)] for i, s in enumerate(sequences)],
            "updated": {name for name in before if not torch.equal(before[name], after[name])},
            "names": set(before),
            "vision_wants_grad": any(p.requires_grad for p in vision),
            "vision_in_optimizer": any(id(p) in in_optimizer for p in vision),
            "video_error": video_error,
        }


def test_freeze_vision_tower(dist_pool, reference):
    """A frozen tower still embeds the images (HF's logits) but gets no gradient and no update."""
    case = dist_pool(1).run(run_frozen, reference["model"], reference["state"], timeout=600)[0]
    for i, (got, want) in enumerate(zip(case["logits"], reference["logits"])):
        torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_TOL, msg=f"logits of sequence {i}")
    vision = {name for name in case["names"] if name.startswith("vision_model.")}
    assert vision and not case["vision_wants_grad"] and not case["vision_in_optimizer"]
    assert case["updated"] == case["names"] - vision
    assert "videos are not supported" in case["video_error"]


def test_deepstack_layouts_refused_before_the_run():
    """DeepStack's layers must all be on the first stage (2 here: pp*vpp up to 2 of 4 layers) and
    full recompute would lose its features: both refused by the config checks."""
    from rlsd_megatron.config import PrecisionConfig
    from rlsd_megatron.config_checks import layout_problems

    model = MODELS["qwen3_vl"]

    def problems(**kwargs) -> list[str]:
        precision = PrecisionConfig(**kwargs.pop("precision", {}))
        return [p for p in layout_problems(Config(model=model, parallel=ParallelConfig(**kwargs), precision=precision),
                                           8) if "DeepStack" in p]

    assert problems(pp=2) == [] and problems(pp=1) == []
    assert "put 1 of model.num_layers=4 there: use at most 2" in problems(pp=4)[0]
    assert "put 1 of model.num_layers=4" in problems(pp=2, vpp=2)[0]
    assert "recompute_granularity=full" in problems(precision={"recompute_granularity": "full",
                                                                "recompute_method": "uniform",
                                                                "recompute_num_layers": 1})[0]
    qwen25 = dataclasses.replace(MODELS["qwen2_5_vl"], num_layers=4)
    assert not [p for p in layout_problems(Config(model=qwen25, parallel=ParallelConfig(pp=4)), 8) if "DeepStack" in p]


def test_parity_with_transformers(dist_pool, reference):
    model, state = reference["model"], reference["state"]
    single = dist_pool(1).run(run_layouts, model, state, [(1, 1)], timeout=600)[0]
    cases = {**single, **dist_pool(2).run(run_layouts, model, state, [(2, 1), (1, 2), (2, 1, True)], timeout=600)[0]}
    for layout, case in cases.items():
        try:
            assert_matches_hf(case, reference)
        except AssertionError as exc:
            raise AssertionError(f"(tp, pp, sequence parallel)={layout}: {exc}") from exc


def test_interleaved_pipeline_matches_transformers(dist_pool):
    """PP=3 x VPP=2 (6 layers, one per chunk; the tower on rank 0's first chunk, the output layer on
    rank 2's second), one sequence per micro-batch: the images' embeddings enter the first chunk
    in the schedule's order. Qwen2.5-VL: Qwen3-VL's DeepStack needs its layers on one chunk."""
    model = dataclasses.replace(MODELS["qwen2_5_vl"], num_layers=6)
    reference = hf_reference(model)
    case = dist_pool(3).run(run_learner, model, reference["state"], 1, 3, vpp=2, split=[[0], [1], [2]],
                            timeout=600)[0]
    assert_matches_hf(case, reference)


MODEL = MODELS["qwen2_5_vl"]  # the checkpoint test's: the tower is a plain module child for both types


def save_and_reload(root: str) -> dict:
    """A VL learner saved at TP=2 and loaded at PP=2 (dist_checkpointing reshards): canonical
    weights of both, on every rank."""
    from rlsd_megatron.checkpoint import load_checkpoint, save_checkpoint
    from rlsd_megatron.config import CheckpointConfig
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    with model_parallel(tp=2, seed=5):
        cfg = Config(model=MODEL, parallel=ParallelConfig(tp=2))
        learner = Learner(cfg)
        save_checkpoint(root, learner.model, cfg, iteration=1)
        saved = learner.full_state()
    with model_parallel(pp=2, seed=9):
        learner = Learner(Config(model=MODEL, parallel=ParallelConfig(pp=2), checkpoint=CheckpointConfig(init_from=root)))
        load_checkpoint(root, learner.model, model=MODEL)
        loaded = learner.full_state()
    return {"saved": saved, "loaded": loaded}


def test_checkpoint_reshards_vision_tower(dist_pool, tmp_path):
    """The replicated tower is saved once under TP=2 and comes back whole on the first stage of PP=2."""
    result = dist_pool(2).run(save_and_reload, str(tmp_path), timeout=600)[0]
    assert any(name.startswith("vision_model.") for name in result["saved"])
    assert set(result["loaded"]) == set(result["saved"])
    for name, tensor in result["saved"].items():
        assert torch.equal(result["loaded"][name], tensor), name


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "thd"])
def test_te_layers_match_transformers_on_gpu(gpu_pool, reference, packed):
    """Transformer Engine's layers (unfused M-RoPE) on one GPU, fp32, padded or packed THD
    micro-batches (M-RoPE's per-token frequencies at each sequence's offset): transformers'
    logits within 1e-4 and gradients within 1e-3 relative (TE's kernels sum in other orders)."""
    case = gpu_pool(1).run(run_learner, reference["model"], reference["state"], 1, 1, impl="transformer_engine",
                           packed=packed, timeout=600)[0]
    for i, (got, want) in enumerate(zip(case["logits"], reference["logits"])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=f"logits of sequence {i}")
    for name, want in reference["grads"].items():
        if name in case["grads"]:
            diff = (case["grads"][name] - want).abs().max() / want.abs().max()
            assert diff < 1e-3, f"grad {name}: relative diff {diff:.2e}"
