"""HF ⇄ Megatron converters (tools/convert_*.py, rlsd_megatron.checkpoint.convert).

A tiny random HF model of each family (saved index-sharded by `transformers`, no downloads) is
converted for TP=2/PP=2 and loaded by a 4-rank gloo learner at that layout: its logits equal
HF's within 1e-5 (fp32). The export back is bit-exact and loads in `transformers`; a learner
checkpoint saved at TP=2/PP=1 goes to HF and back to a TP=1/PP=2 learner unchanged; bad
inputs fail with messages that say what is wrong. The HF side runs in the test process, the
Megatron side in one shared 4-rank pool (conversions on its rank 0).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rlsd_megatron.config import Config, ModelConfig, ParallelConfig
from tests.hf_models import random_hf_model, tiny_families

TOL = 1e-5
# Every dense family at TP=2 (4 heads, 2 KV groups) / PP=2 (one layer per stage), vocab 97 (padded).
FAMILIES = {name: model for name, model in tiny_families().items() if model.num_experts is None}
# Qwen3-MoE (4 experts over 2 layers) converted for TP=2 and loaded at EP=2 x TP=2 and EP=2 x PP=2.
MOE = tiny_families()["qwen3_moe"]
QWEN2_MOE = tiny_families()["qwen2_moe"]  # 4 experts and a shared expert, at the same layouts


def sequences(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in (11, 6)]


def save_hf_model(model: ModelConfig, out: Path):
    """A random HF model of `model`'s family saved as several safetensors shards + index."""
    hf = random_hf_model(model, bos_token_id=1, eos_token_id=2)
    hf.save_pretrained(out, max_shard_size="40KB")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))  # stands in for tokenizer files
    return hf.eval()


def safetensors_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


# ---------------------------------------------------------------------------------------------
# Run on every rank of the pool


def convert_to_megatron(hf_dir, out, tp, pp, dtype="auto"):
    from rlsd_megatron.checkpoint.convert import convert_hf_to_megatron

    lines: list[str] = []
    convert_hf_to_megatron(hf_dir, out, tp=tp, pp=pp, dtype=dtype, progress=False, log=lines.append)
    return lines


def convert_to_hf(ckpt, out, **kwargs):
    from rlsd_megatron.checkpoint.convert import convert_megatron_to_hf

    convert_megatron_to_hf(ckpt, out, progress=False, log=lambda line: None, **kwargs)


def error_of(fn, *args, **kwargs) -> str | None:
    """Run fn; return the message of the CheckpointError it raised (None if it did not)."""
    from rlsd_megatron.checkpoint import CheckpointError

    try:
        fn(*args, **kwargs)
    except CheckpointError as exc:
        return str(exc)
    return None


def run_cli(main, argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def parallel_layout(model: ModelConfig, tp: int, pp: int, ep: int) -> ParallelConfig:
    """(tp, pp, ep), with the sequence parallelism megatron-core requires of MoE under TP."""
    return ParallelConfig(tp=tp, pp=pp, ep=ep, sequence_parallel=bool(model.num_experts) and tp > 1)


def logits_from_checkpoint(ckpt, model: ModelConfig, tp: int, pp: int, seqs, ep: int = 1):
    """Load `ckpt` into a learner at (tp, pp, ep) and return the full-vocabulary logits per sequence."""
    from megatron.core import parallel_state

    from rlsd_megatron.checkpoint import load_checkpoint
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    with model_parallel(tp=tp, pp=pp, ep=ep):
        learner = Learner(Config(model=model, parallel=parallel_layout(model, tp, pp, ep)))
        load_checkpoint(ckpt, learner.model, model=model)

        def gather(logits, mb):
            group = parallel_state.get_tensor_model_parallel_group()
            shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
            dist.all_gather(shards, logits.contiguous(), group=group)
            return {"logits": torch.cat(shards, dim=-1)[..., : model.vocab_size]}

        outputs = learner.forward([learner.micro_batch(seqs)], gather)
        if outputs is None or parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        return [outputs[0]["logits"][i, : len(s)] for i, s in enumerate(seqs)]


def save_learner(root, model: ModelConfig, tp: int, pp: int, ep: int = 1):
    """A seeded learner at (tp, pp, ep) saved as iteration 7; returns its canonical weights."""
    from rlsd_megatron.checkpoint import save_checkpoint
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    with model_parallel(tp=tp, pp=pp, ep=ep, seed=42):
        cfg = Config(model=model, parallel=parallel_layout(model, tp, pp, ep))
        learner = Learner(cfg)
        save_checkpoint(root, learner.model, cfg, iteration=7)
        return learner.full_state()


def load_learner(ckpt, model: ModelConfig, tp: int, pp: int, ep: int = 1):
    """Canonical weights of a learner at (tp, pp, ep) after loading `ckpt`."""
    from rlsd_megatron.checkpoint import load_checkpoint
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    with model_parallel(tp=tp, pp=pp, ep=ep, seed=3):
        learner = Learner(Config(model=model, parallel=parallel_layout(model, tp, pp, ep)))
        loaded = load_checkpoint(ckpt, learner.model, model=model)
        learner.optimizer.reload_model_params()
        return loaded.iteration, learner.full_state()


def load_chunks(ckpt, model: ModelConfig):
    """Load `ckpt` into bare TP=1/PP=1 model chunks (no DDP, no optimizer)."""
    from rlsd_megatron.checkpoint import load_checkpoint
    from rlsd_megatron.models.provider import build_model_chunks
    from rlsd_megatron.parallel.state import model_parallel

    with model_parallel():
        load_checkpoint(ckpt, build_model_chunks(Config(model=model), impl="local"), model=model)


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory, dist_pool):
    """family → (HF dir, HF model, Megatron checkpoint root converted for TP=2/PP=2, log)."""
    pool = dist_pool(4)
    cases = {}
    for family, model in FAMILIES.items():
        base = tmp_path_factory.mktemp(family)
        hf = save_hf_model(model, base / "hf")
        lines = pool.run(convert_to_megatron, base / "hf", base / "megatron", 2, 2)[0]
        cases[family] = (base / "hf", hf, base / "megatron", lines)
    return cases


def test_converted_models_give_hf_logits_at_tp2_pp2(converted, dist_pool):
    for family, (_, hf, ckpt, lines) in converted.items():
        assert any("at most 1 held at once" in line for line in lines), lines  # streamed
        seqs = sequences(FAMILIES[family].vocab_size)
        with torch.no_grad():
            want = [hf(s[None]).logits[0] for s in seqs]
        got = next(r for r in dist_pool(4).run(logits_from_checkpoint, ckpt, FAMILIES[family], 2, 2, seqs) if r)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=TOL, msg=family)


def test_hf_megatron_hf_round_trip_is_bit_exact(converted, dist_pool, tmp_path):
    import transformers

    for family, (hf_dir, hf, ckpt, _) in converted.items():
        out = tmp_path / family
        dist_pool(4).run(convert_to_hf, ckpt, out, max_shard_size="30KB")
        want, got = safetensors_state(hf_dir), safetensors_state(out)
        assert sorted(got) == sorted(want), family
        for name in want:
            assert torch.equal(got[name], want[name]), (family, name)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(want) and len(set(index["weight_map"].values())) > 1
        config = json.loads((out / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # kept from the source config
        assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
        back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        seq = sequences(FAMILIES[family].vocab_size)[0][None]
        with torch.no_grad():
            assert torch.equal(back(seq).logits, hf(seq).logits), family
    # bf16 export: the fp32 weights rounded once.
    hf_dir, _, ckpt, _ = converted["qwen3"]
    dist_pool(4).run(convert_to_hf, ckpt, tmp_path / "bf16", dtype="bf16")
    got, want = safetensors_state(tmp_path / "bf16"), safetensors_state(hf_dir)
    assert all(torch.equal(got[n], want[n].to(torch.bfloat16)) for n in want)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_tp2_checkpoint_reshards_to_tp1_pp2_directly_and_through_hf(dist_pool, tmp_path):
    pool = dist_pool(4)
    model = FAMILIES["qwen2"]  # tied embeddings: the last stage's output copy must be restored too
    saved = pool.run(save_learner, tmp_path / "run", model, 2, 1)[0]
    iteration, direct = pool.run(load_learner, tmp_path / "run", model, 1, 2)[0]
    assert iteration == 7
    pool.run(convert_to_hf, tmp_path / "run", tmp_path / "hf")
    pool.run(convert_to_megatron, tmp_path / "hf", tmp_path / "megatron", 1, 2)
    _, via_hf = pool.run(load_learner, tmp_path / "megatron", model, 1, 2)[0]
    assert sorted(direct) == sorted(saved) == sorted(via_hf)
    for name in saved:
        assert torch.equal(direct[name], saved[name]), name
        assert torch.equal(via_hf[name], saved[name]), name


def test_dry_run_prints_the_mapping_and_megatron_lm_args(converted, dist_pool, tmp_path):
    import tools.convert_hf_to_megatron as cli

    hf_dir = converted["llama"][0]
    code, text = dist_pool(4).run(run_cli, cli.main, ["--hf-dir", str(hf_dir), "--out", str(tmp_path / "x"),
                                                      "--tp", "2", "--pp", "2", "--dry-run"])[0]
    assert code == 0 and not (tmp_path / "x").exists()
    assert "decoder.layers.self_attention.linear_qkv.weight[0] (128, 64)  <-  qkv: model.layers.0.self_attn.q_proj.weight (64, 64)" in text
    assert "embedding.word_embeddings.weight (256, 64) (vocab padded)" in text  # padded for TP=2
    for arg in ("--tensor-model-parallel-size 2", "--num-query-groups 2", "--use-rope-scaling",
                "--untie-embeddings-and-output-weights", "--ckpt-format torch_dist"):
        assert arg in text


def test_bad_inputs_fail_with_clear_errors(converted, dist_pool, tmp_path, capsys):
    import shutil

    import tools.convert_hf_to_megatron as cli
    from rlsd_megatron.checkpoint.convert import validate_hf_checkpoint
    from rlsd_megatron.checkpoint.directory import CheckpointError
    from rlsd_megatron.models.hf_mapping import MappingError

    hf_dir, _, ckpt, _ = converted["qwen3"]
    # The CLI: a layout the model cannot be split into (checked before any process group starts).
    assert cli.main(["--hf-dir", str(hf_dir), "--out", str(tmp_path / "o"), "--tp", "4"]) == 2
    assert "model.num_query_groups=2 is not divisible by parallel.tp=4" in capsys.readouterr().err
    # A directory that is no HF model; an earlier conversion is not replaced without --overwrite.
    assert cli.main(["--hf-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"--hf-dir {tmp_path}: no config.json there" in capsys.readouterr().err
    assert cli.main(["--hf-dir", str(hf_dir), "--out", str(ckpt)]) == 2
    assert "already holds a converted checkpoint (release/); pass --overwrite" in capsys.readouterr().err
    # config.json that does not describe the tensors.
    bad = tmp_path / "bad_hf"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight: \(96, 64\) \(config implies \(128, 64\)\)"):
        validate_hf_checkpoint(bad, 1, 1, None)
    # A missing shard file / tensor.
    (bad / "config.json").write_text(json.dumps(config))
    next(bad.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="not in .*incomplete download"):
        validate_hf_checkpoint(bad, 1, 1, None)
    (bad / "model.safetensors.index.json").unlink()
    with pytest.raises(MappingError, match="missing tensors"):
        validate_hf_checkpoint(bad, 1, 1, None)

    pool = dist_pool(4)
    # Exporting with the architecture of another model.
    llama_config = converted["llama"][0] / "config.json"
    message = pool.run(error_of, convert_to_hf, ckpt, tmp_path / "wrong", hf_config=llama_config)[0]
    assert "does not match the llama model config" in message
    assert "tensors the model does not have: ['decoder.layers.self_attention.k_layernorm.weight'" in message
    # A truncated data file (an interrupted copy).
    broken = tmp_path / "truncated"
    shutil.copytree(ckpt, broken)
    data = next((broken / "release").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    message = pool.run(error_of, convert_to_hf, broken, tmp_path / "t")[0]
    assert "truncated or corrupt" in message
    message = pool.run(error_of, load_chunks, broken, FAMILIES["qwen3"])[0]
    assert "loading" in message and "truncated" in message


@pytest.mark.gpu
def test_fp8_export_with_modelopt(tmp_path):
    pytest.importorskip("modelopt")
    from rlsd_megatron.checkpoint.fp8_export import export_fp8

    hf = save_hf_model(FAMILIES["llama"], tmp_path / "hf")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    export_fp8(tmp_path / "bf16", tmp_path / "fp8", log=lambda line: None)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "FP8"
    weights = safetensors_state(tmp_path / "fp8")
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.0.mlp.down_proj.weight_scale" in weights


def moe_hf_megatron_hf(pool, model: ModelConfig, tmp_path: Path) -> list[str]:
    """HF MoE model → Megatron (for TP=2) → a learner at EP=2 x TP=2 gives HF's logits; the export
    back is bit-exact and transformers loads it. Returns the conversion's log."""
    import transformers

    hf = save_hf_model(model, tmp_path / "hf")
    lines = pool.run(convert_to_megatron, tmp_path / "hf", tmp_path / "megatron", 2, 1)[0]
    assert any("at most 1 held at once" in line for line in lines) and "--num-experts 4" in "".join(lines)
    seqs = sequences(model.vocab_size)
    with torch.no_grad():
        want = [hf(s[None]).logits[0] for s in seqs]
    got = next(r for r in pool.run(logits_from_checkpoint, tmp_path / "megatron", model, 2, 1, seqs, 2) if r)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=TOL)

    pool.run(convert_to_hf, tmp_path / "megatron", tmp_path / "back", max_shard_size="30KB")
    source, back = safetensors_state(tmp_path / "hf"), safetensors_state(tmp_path / "back")
    assert sorted(back) == sorted(source) and "model.layers.1.mlp.experts.3.down_proj.weight" in back
    assert all(torch.equal(back[name], source[name]) for name in source)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(seqs[0][None]).logits, hf(seqs[0][None]).logits)
    return lines


def test_moe_converts_at_any_expert_layout_and_round_trips_bit_exact(dist_pool, tmp_path):
    """Qwen3-MoE through `moe_hf_megatron_hf`; and a learner saved at EP=2 x PP=2 goes to HF and back
    to EP=2 x TP=2 unchanged (megatron keys experts by global number, so EP is not in the files)."""
    pool = dist_pool(4)
    moe_hf_megatron_hf(pool, MOE, tmp_path)

    saved = pool.run(save_learner, tmp_path / "run", MOE, 1, 2, 2)[0]
    pool.run(convert_to_hf, tmp_path / "run", tmp_path / "run_hf")
    pool.run(convert_to_megatron, tmp_path / "run_hf", tmp_path / "run_megatron", 2, 1)
    _, via_hf = pool.run(load_learner, tmp_path / "run_megatron", MOE, 2, 1, 2)[0]
    assert sorted(via_hf) == sorted(saved) and "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight" in saved
    for name in saved:
        assert torch.equal(via_hf[name], saved[name]), name


def test_qwen2_moe_converts_with_its_shared_expert_and_round_trips_bit_exact(dist_pool, tmp_path):
    """Qwen2-MoE (QKV bias, a gated shared expert) through `moe_hf_megatron_hf` (the shared expert and
    its gate among the tensors compared); the Megatron-LM arguments written with it build that MLP."""
    moe_hf_megatron_hf(dist_pool(4), QWEN2_MOE, tmp_path)
    lm_args = (tmp_path / "megatron" / "release" / "megatron_lm_args.txt").read_text()
    assert "--moe-shared-expert-intermediate-size 24 \\\n--moe-shared-expert-gate" in lm_args
    assert "--add-qkv-bias" in lm_args and "--moe-router-pre-softmax" in lm_args
