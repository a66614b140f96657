"""Qwen2.5-VL on the Megatron learner against transformers' own model (issue 19).

A tiny random Qwen2.5-VL (tests.hf_models) and three sequences: two images inside one sequence,
one image in another, a text-only one, right-padded in one batch (one image through transformers'
image processor, the others random patches). Our learner, loaded from the HF
state dict through the HF ⇄ Megatron mapping, must give transformers' logits, loss and the
gradient of every HF tensor (vision tower included) at TP=1, TP=2 and PP=2, in fp32:
logits and loss within 1e-5 absolute (values of order 1), gradients within 1e-5 relative to the
tensor's largest entry (the attention kernels and summation orders differ: Megatron's local
attention vs HF's eager, TP's split reductions).
"""

from __future__ import annotations

import json

import pytest
import torch

from rlsd_megatron.config import Config, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig
from tests.hf_models import random_hf_vision_language_model, tiny_vision_language_model
from tests.learner.test_parallel_parity import gather_vocab, nll_loss_fn

LOGITS_TOL = 1e-5
GRAD_TOL = 1e-5
MODEL = tiny_vision_language_model()
GRIDS = [(1, 4, 6), (1, 8, 4), (1, 6, 4)]  # (t, h, w) ViT patches: 6, 8 and 6 image tokens


def make_inputs() -> tuple[list[torch.Tensor], list]:
    """Three token sequences with their images (`ImageInputs` or None), as the processor lays them out."""
    from rlsd_megatron.models.vision_language import ImageInputs

    vision = MODEL.vision
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


def hf_reference() -> dict:
    """transformers' logits per sequence, token-mean NLL and every gradient, on the padded batch."""
    hf = random_hf_vision_language_model(MODEL)
    sequences, images = make_inputs()
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
        mm_token_type_ids=(input_ids == MODEL.vision.image_token_id).int(),
        pixel_values=torch.cat([x.pixel_values for x in present]),
        image_grid_thw=torch.cat([x.image_grid_thw for x in present]),
    ).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    mask = attention_mask[:, 1:].bool()
    loss = (nll * mask).sum() / mask.sum()
    loss.backward()
    return {
        "state": {name: t.detach().clone() for name, t in hf.state_dict().items()},
        "logits": [logits[i, :len(s)].detach() for i, s in enumerate(sequences)],
        "loss": loss.item(),
        "grads": {name: p.grad.clone() for name, p in hf.named_parameters()},
    }


def run_learner(hf_state: dict, tp: int, pp: int, impl: str = "local") -> dict:
    """Our learner at (tp, pp) with `impl` layers loaded from `hf_state`: logits per sequence, loss
    and every gradient under HF names (on every rank), what the step updated."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.learner.vision_batch import vision_micro_batch
    from rlsd_megatron.models.hf_mapping import hf_to_megatron, megatron_to_hf
    from rlsd_megatron.parallel.state import model_parallel

    cfg = Config(model=MODEL, parallel=ParallelConfig(tp=tp, pp=pp, use_distributed_optimizer=False),
                 optimizer=OptimizerConfig(lr=1e-3, clip_grad=0.0), train=TrainConfig(steps=10))
    vocab = MODEL.vocab_size
    sequences, images = make_inputs()
    # Two micro-batches (gradient accumulation): sequences 0 and 2, then 1.
    split = [[0, 2], [1]]
    with model_parallel(tp=tp, pp=pp):
        learner = Learner(cfg, impl=impl)
        learner.load_full_state(dict(hf_to_megatron(hf_state.__getitem__, MODEL)))
        before = learner.full_state()
        micro_batches = [vision_micro_batch([sequences[i] for i in idx], [images[i] for i in idx], MODEL.vision)
                         for idx in split]
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
            logits[i] = out["logits"][row, :len(sequences[i])].cpu()
    hf_grads = {}
    for name, grad in grads.items():
        hf_grads.update(megatron_to_hf(name, grad, MODEL))
    updated = {name for name in before if not torch.equal(before[name], after[name])}
    return {"logits": [logits[i] for i in range(len(sequences))], "loss": float(loss), "grads": hf_grads,
            "updated": updated, "names": set(before)}


def run_layouts(hf_state: dict, layouts: list[tuple[int, int]]) -> dict:
    return {layout: run_learner(hf_state, *layout) for layout in layouts}


@pytest.fixture(scope="module")
def reference():
    return hf_reference()


def assert_matches_hf(case: dict, ref: dict) -> None:
    for i, (got, want) in enumerate(zip(case["logits"], ref["logits"])):
        torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_TOL, msg=f"logits of sequence {i}")
    assert case["loss"] == pytest.approx(ref["loss"], abs=LOGITS_TOL)
    tied = {"lm_head.weight"} if MODEL.tie_word_embeddings else set()
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

    hf = random_hf_vision_language_model(MODEL)
    sequences, images = make_inputs()
    mb = vision_micro_batch(sequences, images, MODEL.vision)
    attention_mask = torch.zeros_like(mb.tokens)
    for i, seq in enumerate(sequences):
        attention_mask[i, :len(seq)] = 1
    want, _ = hf.model.get_rope_index(mb.tokens, (mb.tokens == MODEL.vision.image_token_id).int(),
                                      image_grid_thw=mb.images.image_grid_thw, attention_mask=attention_mask)
    mask = attention_mask.bool().expand(3, -1, -1)
    assert torch.equal(mb.position_ids[mask], want[mask])
    # The second image of sequence 0 starts after the first image's max(h, w)/2 = 3 positions and 3 text tokens.
    assert mb.position_ids[:, 0, 4 + 6 + 3].tolist() == [4 + 3 + 3] * 3


def test_mrope_rejects_image_tokens_without_grid():
    from rlsd_megatron.models.mrope import mrope_position_ids

    tokens = torch.tensor([1, 96, 96, 2])
    with pytest.raises(ValueError, match="needs 4 consecutive image tokens"):
        mrope_position_ids(tokens, torch.tensor([[1, 4, 4]]), image_token_id=96, spatial_merge_size=2)


def test_hf_config_round_trip(tmp_path):
    """A Qwen2.5-VL config.json written by transformers reads back into the same ModelConfig."""
    from rlsd_megatron.config import load_config

    hf = random_hf_vision_language_model(MODEL)
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    cfg = load_config(None, [f"model.hf_config={tmp_path}", "model.freeze_vision_tower=true"])
    assert cfg.model.vision == MODEL.vision
    assert ModelConfig(**{**vars(cfg.model), "hf_config": None, "freeze_vision_tower": False}) == MODEL


def run_frozen(hf_state: dict) -> dict:
    """One train step at TP=1 with `freeze_vision_tower`: logits per sequence, which weights the
    step changed, and whether any vision parameter wants gradients or sits in the optimizer."""
    import dataclasses

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.learner.vision_batch import vision_micro_batch
    from rlsd_megatron.models.hf_mapping import hf_to_megatron
    from rlsd_megatron.parallel.state import model_parallel

    model = dataclasses.replace(MODEL, freeze_vision_tower=True)
    cfg = Config(model=model, optimizer=OptimizerConfig(lr=1e-3), train=TrainConfig(steps=10))
    sequences, images = make_inputs()
    with model_parallel():
        learner = Learner(cfg)
        learner.load_full_state(dict(hf_to_megatron(hf_state.__getitem__, model)))
        before = learner.full_state()
        mb = vision_micro_batch(sequences, images, model.vision)
        out = learner.forward([mb], lambda logits, mb: {"logits": logits[..., :model.vocab_size]})[0]
        learner.train_step([mb], nll_loss_fn(model.vocab_size, sum(len(s) - 1 for s in sequences)))
        after = learner.full_state()
        vision = [p for name, p in learner.named_parameters() if name.startswith("vision_model.")]
        in_optimizer = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
        return {
            "logits": [out["logits"][i, :len(s)] for i, s in enumerate(sequences)],
            "updated": {name for name in before if not torch.equal(before[name], after[name])},
            "names": set(before),
            "vision_wants_grad": any(p.requires_grad for p in vision),
            "vision_in_optimizer": any(id(p) in in_optimizer for p in vision),
        }


def test_freeze_vision_tower(dist_pool, reference):
    """A frozen tower still embeds the images (HF's logits) but gets no gradient and no update."""
    case = dist_pool(1).run(run_frozen, reference["state"], timeout=600)[0]
    for i, (got, want) in enumerate(zip(case["logits"], reference["logits"])):
        torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_TOL, msg=f"logits of sequence {i}")
    vision = {name for name in case["names"] if name.startswith("vision_model.")}
    assert vision and not case["vision_wants_grad"] and not case["vision_in_optimizer"]
    assert case["updated"] == case["names"] - vision


def test_parity_with_transformers(dist_pool, reference):
    single = dist_pool(1).run(run_layouts, reference["state"], [(1, 1)], timeout=600)[0]
    cases = {**single, **dist_pool(2).run(run_layouts, reference["state"], [(2, 1), (1, 2)], timeout=600)[0]}
    for (tp, pp), case in cases.items():
        try:
            assert_matches_hf(case, reference)
        except AssertionError as exc:
            raise AssertionError(f"tp={tp} pp={pp}: {exc}") from exc


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
def test_te_layers_match_transformers_on_gpu(gpu_pool, reference):
    """Transformer Engine's layers (unfused M-RoPE, padded batches) on one GPU, fp32: transformers'
    logits within 1e-4 and gradients within 1e-3 relative (TE's kernels sum in other orders)."""
    case = gpu_pool(1).run(run_learner, reference["state"], 1, 1, "transformer_engine", timeout=600)[0]
    for i, (got, want) in enumerate(zip(case["logits"], reference["logits"])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=f"logits of sequence {i}")
    for name, want in reference["grads"].items():
        if name in case["grads"]:
            diff = (case["grads"][name] - want).abs().max() / want.abs().max()
            assert diff < 1e-3, f"grad {name}: relative diff {diff:.2e}"
