"""SmolLM2-135M-Instruct through our checkpoint tools, learner and weight sync (the `real` tier).

The model allows TP=1/PP=2 (30 layers) and TP=3 (9 heads, 3 KV heads); TP=2 must be refused
with a message naming the head counts. At each allowed layout, on a gloo pool of that size:
- `convert_hf_to_megatron` (the function behind tools/convert_hf_to_megatron.py) writes a
  checkpoint; our learner loads it and its logits on real chat text (rendered with the model's
  chat template) equal transformers' within `LOGIT_TOL`;
- the learner saves its own checkpoint, which `convert_megatron_to_hf` exports bit-exactly to the
  original safetensors (so the learner's sharded state, not only the converter, is exact);
- at PP=2, `sync_weights` writes the learner's weights into the embedded engine, which then holds
  bit-identical tensors and generates greedily token for token what transformers' `generate` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rlsd_megatron.config import Config, ModelConfig, ParallelConfig
from tests.real.conftest import MAX_NEW_TOKENS, QUESTIONS
from tests.tools.test_convert import (convert_to_hf, convert_to_megatron, logits_from_checkpoint, run_cli,
                                      safetensors_state)

pytestmark = pytest.mark.real

# fp32 logits of a 30-layer model (values up to ~30). Measured max |difference|: 0 at TP=1 PP=2
# (the same arithmetic as HF's eager attention), 6.8e-5 at TP=3 (the row-parallel layers add three
# partial sums, in another order than one matmul).
LOGIT_TOL = 2e-4


def learner_round_trip(ckpt: Path, model: ModelConfig, tp: int, pp: int, seqs, saved: Path):
    """Load `ckpt` at (tp, pp), return the full-vocabulary logits of `seqs` (rank 0 of the last
    stage, else None) and save the learner's weights to `saved` (iteration 1)."""
    from rlsd_megatron.checkpoint import load_checkpoint, save_checkpoint
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    logits = logits_from_checkpoint(ckpt, model, tp, pp, seqs)
    with model_parallel(tp=tp, pp=pp):
        cfg = Config(model=model, parallel=ParallelConfig(tp=tp, pp=pp))
        learner = Learner(cfg)
        load_checkpoint(ckpt, learner.model, model=model)
        save_checkpoint(saved, learner.model, cfg, iteration=1)
    return logits


def sync_and_generate(ckpt: Path, model: ModelConfig, tp: int, pp: int, prompts: list[list[int]], eos: int):
    """A learner at (tp, pp) loaded from `ckpt` pushes its weights into an embedded engine on rank 0
    (`rollout.weight_sync.sync_weights`, the trainer's call), which then generates greedily.
    Rank 0 returns (the engine's HF-named state, token ids per prompt, finish reasons)."""
    from rlsd_megatron.checkpoint import load_checkpoint
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.rollout import SamplingParams, sync_weights
    from rlsd_megatron.rollout.embedded import EmbeddedEngine

    with model_parallel(tp=tp, pp=pp):
        learner = Learner(Config(model=model, parallel=ParallelConfig(tp=tp, pp=pp)))
        load_checkpoint(ckpt, learner.model, model=model)
        engine = EmbeddedEngine(model) if dist.get_rank() == 0 else None
        stats = sync_weights(learner.model, model, engine, version=5)
        if engine is None:
            return None
        generations = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS,
                                                              stop_token_ids=(eos,)))
        state = {name: tensor.clone() for name, tensor in engine.model.state_dict().items()}
        return state, [g.token_ids for g in generations], [g.finish_reason for g in generations], \
            engine.health().weight_version, stats.bytes


def hf_logits(hf_model, seqs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf_model(s[None]).logits[0] for s in seqs]


def assert_logits_match(got, want, layout: str):
    for g, w in zip(got, want):
        diff = float((g - w).abs().max())
        print(f"{layout}: max |logit difference| {diff:.2e} ({len(g)} tokens)")
        assert diff < LOGIT_TOL, f"{layout}: max |logit difference| {diff:.2e} over {LOGIT_TOL}"
        assert torch.equal(g.argmax(-1), w.argmax(-1)), layout


def assert_exported_bit_exact(original: Path, exported: Path):
    import transformers

    from rlsd_megatron.models.hf_config import model_fields_from_hf

    want, got = safetensors_state(original), safetensors_state(exported)
    assert sorted(got) == sorted(want) and "lm_head.weight" not in got  # tied: embed_tokens only
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert model_fields_from_hf(exported) == model_fields_from_hf(original)
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (exported / name).read_bytes() == (original / name).read_bytes(), name
    assert transformers.AutoTokenizer.from_pretrained(exported).chat_template


@pytest.fixture(scope="module")
def pp2_checkpoint(real_model_dir, dist_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp2") / "megatron"
    lines = dist_pool(2).run(convert_to_megatron, real_model_dir, out, 1, 2)[0]
    assert any("at most" in line for line in lines), lines  # streamed
    return out


def test_tp1_pp2_learner_logits_and_round_trip(pp2_checkpoint, real_model_dir, real_model, hf_model, chat_sequences,
                                              dist_pool, tmp_path):
    pool = dist_pool(2)
    results = pool.run(learner_round_trip, pp2_checkpoint, real_model, 1, 2, chat_sequences, tmp_path / "saved")
    assert results[0] is None  # rank 0 is the first stage: the logits live on the last one
    assert_logits_match(results[1], hf_logits(hf_model, chat_sequences), "TP=1 PP=2")
    pool.run(convert_to_hf, tmp_path / "saved", tmp_path / "hf", tokenizer_dir=real_model_dir)
    assert_exported_bit_exact(real_model_dir, tmp_path / "hf")


def test_weight_sync_into_embedded_engine_then_greedy_generation(pp2_checkpoint, real_model_dir, real_model,
                                                                  real_tokenizer, reference_greedy, dist_pool):
    from rlsd_megatron.data.teacher_context import hf_chat_renderer

    render = hf_chat_renderer(real_tokenizer)
    prompts = [render(q) for q in QUESTIONS]
    state, tokens, finish, version, synced = dist_pool(2).run(
        sync_and_generate, pp2_checkpoint, real_model, 1, 2, prompts, real_tokenizer.eos_token_id)[0]
    want = safetensors_state(real_model_dir)
    assert sorted(n for n in state if n != "lm_head.weight") == sorted(want)
    assert all(torch.equal(state[n], want[n]) for n in want)
    assert version == 5 and synced == sum(t.numel() * t.element_size() for t in want.values())
    assert tokens == reference_greedy
    for ids, reason in zip(tokens, finish):
        assert reason == ("stop" if ids[-1] == real_tokenizer.eos_token_id else "length")


def test_example_config_passes_the_trainers_start_up_checks(pp2_checkpoint, real_model_dir, tmp_path):
    """examples/configs/real_model.yaml as examples/real_model.sh completes it (2 processes)."""
    import tools.make_math_data as make
    from rlsd_megatron.config import load_config
    from rlsd_megatron.config_checks import validate_config
    from rlsd_megatron.train import input_problems

    train, val = make.arithmetic_rows(train=8, val=4, seed=0)
    make.write_jsonl(train, tmp_path / "train.jsonl")
    make.write_jsonl(val, tmp_path / "val.jsonl")
    cfg = load_config("examples/configs/real_model.yaml", [
        f"model.hf_config={real_model_dir}", f"data.tokenizer_dir={real_model_dir}",
        f"checkpoint.init_from={pp2_checkpoint}", f"data.train_files=[{tmp_path / 'train.jsonl'}]",
        f"data.val_files=[{tmp_path / 'val.jsonl'}]"])
    validate_config(cfg, 2, cuda_available=False)
    assert input_problems(cfg) == []
    assert (cfg.model.num_layers, cfg.model.num_query_groups, cfg.model.tie_word_embeddings) == (30, 3, True)


@pytest.fixture(scope="module")
def tp3_checkpoint(real_model_dir, dist_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp3") / "megatron"
    dist_pool(3).run(convert_to_megatron, real_model_dir, out, 3, 1)
    return out


def test_tp3_learner_logits_and_round_trip(tp3_checkpoint, real_model_dir, real_model, hf_model, chat_sequences,
                                           dist_pool, tmp_path):
    pool = dist_pool(3)
    results = pool.run(learner_round_trip, tp3_checkpoint, real_model, 3, 1, chat_sequences, tmp_path / "saved")
    assert results[1] is None and results[2] is None  # gathered on TP rank 0
    assert_logits_match(results[0], hf_logits(hf_model, chat_sequences), "TP=3")
    pool.run(convert_to_hf, tmp_path / "saved", tmp_path / "hf", tokenizer_dir=real_model_dir)
    assert_exported_bit_exact(real_model_dir, tmp_path / "hf")


def test_tp2_is_refused_with_the_head_counts(real_model_dir, dist_pool, tmp_path, capsys):
    import tools.convert_hf_to_megatron as cli

    assert cli.main(["--hf-dir", str(real_model_dir), "--out", str(tmp_path / "x"), "--tp", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.num_attention_heads=9 is not divisible by parallel.tp=2" in err, err
    assert "model.num_query_groups=3 is not divisible by parallel.tp=2" in err, err
    assert not (tmp_path / "x").exists()
    code, text = dist_pool(3).run(run_cli, cli.main, ["--hf-dir", str(real_model_dir), "--out", str(tmp_path / "y"),
                                                      "--tp", "3", "--dry-run"])[0]
    assert code == 0 and "--num-query-groups 3" in text and "--tensor-model-parallel-size 3" in text
