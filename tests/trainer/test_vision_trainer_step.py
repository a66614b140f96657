"""One RL step of a vision-language policy through the real stack (issue 19): image+text parquet
rows through the image processor and chat template, the embedded Qwen2.5-VL engine generating
with the images, the Megatron VL learner at TP=2 and at PP=2 over gloo, for RLSD, GRPO, OPSD and
SDPO (one pool launch).

The signal, per method and layout: every tensor changes, the vision tower's included (the images
reach the learner and its gradients flow back through them; norms and biases have no weight
decay, so they change only by a gradient); the engine's log-probs of the
sampled tokens equal the learner's within 1e-5 (both read the same images at the same M-RoPE
positions: without the images they would differ by far more); RLSD's hinted teacher differs from
the student (|Δ| > 1e-3); OPSD's and SDPO's distillation losses are positive.
"""

from __future__ import annotations

import dataclasses

import torch

from tests.trainer.test_trainer_step import METHOD_OVERRIDES

METHODS = ("rlsd", "grpo", "opsd", "sdpo")
OVERRIDES = [
    "warm_start.max_steps=0", "train.prompts_per_step=4", "rollout.n=4", "train.micro_batch_size=4",
    "train.max_seq_length=256", "reward.custom_fn=tests.trainer.reward_fns:vowel_fraction", "optimizer.lr=1e-3",
    "train.eval_interval=100", "data.task=null", "data.min_pixels=64", "data.max_pixels=1024",
]


def write_inputs(root: str) -> dict:
    """A VL chat tokenizer and a parquet file of 4 rows (one, two, one and no images)."""
    import io
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from tests.data.conftest import build_vl_tokenizer

    def png(height, width, seed):
        out = io.BytesIO()
        Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")).save(out, "PNG")
        return {"bytes": out.getvalue(), "path": None}

    root = Path(root)
    tokenizer_dir = build_vl_tokenizer(root / "tokenizer")
    rows = [
        {"question": "What is <image> plus 1?", "answer": "2", "images": [png(16, 24, 1)]},
        {"question": "Add <image> and <image>.", "answer": "5", "images": [png(24, 24, 2), png(16, 16, 3)]},
        {"question": "<image> What is x?", "answer": "4", "images": [png(24, 16, 4)]},
        {"question": "What is 1+1?", "answer": "2", "images": []},
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    return {"tokenizer_dir": str(tokenizer_dir), "train": str(root / "train.parquet")}


def vision_model(tokenizer_dir: str):
    from rlsd_megatron.data import load_chat_tokenizer
    from tests.hf_models import tiny_vision_language_model

    tokenizer = load_chat_tokenizer(tokenizer_dir)
    model = tiny_vision_language_model(vocab_size=len(tokenizer))
    # The tokenizer's own image token; it has no video token (the tiny model's id 95 is a text token here).
    return dataclasses.replace(model, vision=dataclasses.replace(
        model.vision, image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"), video_token_id=None))


def one_step(method: str, tp: int, pp: int, inputs: dict, log_dir: str) -> dict:
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer

    cfg = load_config("examples/configs/cpu_demo.yaml", [
        *OVERRIDES, *METHOD_OVERRIDES[method], f"parallel.tp={tp}", f"parallel.pp={pp}", f"logging.dir={log_dir}",
        f"data.train_files=[{inputs['train']}]", f"data.tokenizer_dir={inputs['tokenizer_dir']}"])
    cfg.model = vision_model(inputs["tokenizer_dir"])
    with model_parallel(tp=tp, pp=pp, seed=cfg.train.seed):
        trainer = Trainer(cfg)
        trainer.sync_weights()
        before = trainer.learner.full_state()
        trainer.step = 1
        metrics = trainer.train_step()
        after = trainer.learner.full_state()
        images_per_row = [trainer.dataset[i].images for i in range(len(trainer.dataset))]
        trainer.close()
    return {"metrics": metrics, "unchanged": sorted(k for k in before if torch.equal(before[k], after[k])),
            "vision_tensors": sum(k.startswith("vision_model.") for k in before),
            "images": [x.image_grid_thw.tolist() if x is not None else None for x in images_per_row]}


def all_steps(root: str) -> dict:
    inputs = write_inputs(root)
    return {(method, tp, pp): one_step(method, tp, pp, inputs, f"{root}/{method}-{tp}-{pp}")
            for method in METHODS for tp, pp in ((2, 1), (1, 2))}


def test_one_vision_language_step_per_method_at_tp2_and_pp2(dist_pool, tmp_path):
    results = dist_pool(2).run(all_steps, str(tmp_path), timeout=1200)
    last_rank = results[-1]  # the rank that holds the loss (last pipeline stage)
    for (method, tp, pp), result in last_rank.items():
        where = f"{method} tp={tp} pp={pp}"
        m = result["metrics"]
        assert result["images"] == [[[1, 4, 6]], [[1, 6, 6], [1, 4, 4]], [[1, 6, 4]], None], where
        assert result["vision_tensors"] > 10 and result["unchanged"] == [], (where, result["unchanged"][:5])
        assert m["train/grad_norm"] > 0, where
        assert m["rollout/logprob_mismatch_mean"] < 1e-5, (where, m["rollout/logprob_mismatch_mean"])
        if method == "rlsd":
            assert m["rlsd/delta_abs_mean"] > 1e-3, (where, m["rlsd/delta_abs_mean"])
        if method in ("opsd", "sdpo"):
            assert m["train/distill"] > 0, where
