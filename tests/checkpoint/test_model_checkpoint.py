"""save_checkpoint / load_checkpoint (rlsd_megatron.checkpoint) on a 4-rank gloo pool.

A checkpoint saved at TP=2/PP=2 loads bit-exactly at TP=1/PP=2 with virtual stages and at
TP=1/PP=1 with data parallelism (dist_checkpointing reshards); extra sharded/common state
round-trips; a crash mid-save leaves the previous checkpoint and the tracker intact; a
checkpoint of another architecture or a truncated one raises a clear CheckpointError on every
rank. Directory helpers are tested without processes.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlsd_megatron.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    read_checkpoint_info,
    resolve_checkpoint_dir,
)
from rlsd_megatron.config import CheckpointConfig, Config, ModelConfig, ParallelConfig

MODEL = ModelConfig(family="llama", vocab_size=90, hidden_size=32, num_layers=4, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=64)


def build(tp: int, pp: int, vpp: int | None = None, model: ModelConfig = MODEL, init_from: str | None = None):
    """A learner; with `init_from` its weights are left undrawn (a checkpoint load fills them)."""
    from rlsd_megatron.learner.learner import Learner

    cfg = Config(model=model, parallel=ParallelConfig(tp=tp, pp=pp, vpp=vpp),
                 checkpoint=CheckpointConfig(init_from=init_from))
    return cfg, Learner(cfg)


def save_and_reload(root, layouts):
    """Save at TP=2/PP=2 with extra state, then load at each layout; canonical weights of all."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from rlsd_megatron.checkpoint import load_checkpoint, save_checkpoint
    from rlsd_megatron.parallel.state import model_parallel

    def extra(model_state):  # what a trainer adds: extra sharded state next to the model's
        return {"note": ShardedObject("note", f"saved at pp={len(model_state)}", (1,), (0,), replica_id=dist.get_rank())}

    results = {}
    with model_parallel(tp=2, pp=2, seed=5):
        cfg, learner = build(2, 2)
        path = save_checkpoint(root, learner.model, cfg, iteration=3, extra_sharded=extra,
                               extra_common={"scheduler": {"step": 3}})
        results["saved"] = learner.full_state()
    for tp, pp, vpp in layouts:
        with model_parallel(tp=tp, pp=pp, vpp=vpp, seed=9):
            _, learner = build(tp, pp, vpp, init_from=str(root))
            template = {"note": ShardedObject("note", None, (1,), (0,), replica_id=dist.get_rank())}
            loaded = load_checkpoint(root, learner.model, model=MODEL, extra_sharded=template)
            learner.optimizer.reload_model_params()
            results[(tp, pp, vpp)] = (loaded.iteration, loaded.common["scheduler"], loaded.extra["note"],
                                      str(loaded.path), learner.full_state())
    results["path"] = str(path)
    return results


def test_save_at_tp2_pp2_loads_at_other_layouts(dist_pool, tmp_path):
    layouts = [(1, 2, 2), (1, 1, None)]
    results = dist_pool(4).run(save_and_reload, tmp_path, layouts, timeout=600)[0]
    saved = results["saved"]
    assert results["path"] == str(tmp_path / "iter_0000003")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    for layout in layouts:
        iteration, scheduler, note, path, weights = results[layout]
        assert (iteration, scheduler, note, path) == (3, {"step": 3}, "saved at pp=1", results["path"]), layout
        assert sorted(weights) == sorted(saved)
        for name in saved:
            assert torch.equal(weights[name], saved[name]), (layout, name)
    info = read_checkpoint_info(tmp_path)
    assert (info.iteration, info.layout, info.params_dtype) == (3, {"tp": 2, "pp": 2, "vpp": None}, "fp32")
    assert info.model_config() == MODEL and info.config["parallel"]["tp"] == 2


def crash_mid_save(root):
    """Save iteration 1, crash while saving iteration 2 (data written, one file truncated),
    report what a restart sees, then save iteration 2 properly."""
    from pathlib import Path
    from unittest import mock

    from megatron.core import dist_checkpointing

    from rlsd_megatron.checkpoint import load_checkpoint, save_checkpoint
    from rlsd_megatron.parallel.state import model_parallel

    real_save = dist_checkpointing.save

    def dying_save(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)
        data = sorted(Path(directory).glob("*.distcp"))[0]
        data.write_bytes(data.read_bytes()[:10])
        raise RuntimeError("simulated crash")

    root = Path(root)
    with model_parallel(tp=2, pp=2, seed=5):
        cfg, learner = build(2, 2)
        save_checkpoint(root, learner.model, cfg, iteration=1)
        first = learner.full_state()
        with torch.no_grad():
            for param in learner.model[0].parameters():
                param.add_(1.0)
        second = learner.full_state()
        with mock.patch.object(dist_checkpointing, "save", dying_save):
            try:
                save_checkpoint(root, learner.model, cfg, iteration=2)
                crashed = False
            except RuntimeError:
                crashed = True
        seen = {
            "crashed": crashed,
            "tracker": (root / "latest_checkpointed_iteration.txt").read_text().strip(),
            "dirs": sorted(p.name for p in root.iterdir() if p.is_dir()),
        }
        seen["restart_iteration"] = load_checkpoint(root, learner.model, model=MODEL).iteration
        seen["restart_is_first"] = all(torch.equal(learner.full_state()[k], first[k]) for k in first)
        learner.load_full_state(second)
        save_checkpoint(root, learner.model, cfg, iteration=2)
    seen["after_resave"] = sorted(p.name for p in root.iterdir())
    return seen


def test_crash_mid_save_keeps_the_previous_checkpoint(dist_pool, tmp_path):
    seen = dist_pool(4).run(crash_mid_save, tmp_path)[0]
    assert seen["crashed"] and seen["tracker"] == "1"
    assert seen["dirs"] == ["iter_0000001", "iter_0000002.partial"]
    assert seen["restart_iteration"] == 1 and seen["restart_is_first"]
    assert seen["after_resave"] == ["iter_0000001", "iter_0000002", "latest_checkpointed_iteration.txt"]


def mismatched_loads(root):
    """Error messages (per rank) of loading a TP=2 llama checkpoint into other architectures."""
    import dataclasses
    from pathlib import Path

    import torch.distributed as dist

    from rlsd_megatron.checkpoint import load_checkpoint, save_checkpoint
    from rlsd_megatron.models.provider import build_model_chunks
    from rlsd_megatron.parallel.state import model_parallel

    def chunks(model):  # model chunks alone: load_checkpoint needs no DDP or optimizer
        return build_model_chunks(Config(model=model), impl="local")

    root = Path(root)
    messages = {}
    with model_parallel(tp=2, pp=1):
        cfg = Config(model=MODEL, parallel=ParallelConfig(tp=2))
        save_checkpoint(root, build_model_chunks(cfg, impl="local"), cfg, iteration=1)
    with model_parallel(tp=1, pp=1):
        wider = dataclasses.replace(MODEL, ffn_hidden_size=128)
        biased = dataclasses.replace(MODEL, family="qwen2", qkv_bias=True)
        for case, model, kwargs in [("config", wider, {"model": wider}), ("tensors", wider, {}), ("lacking", biased, {})]:
            if case == "tensors":  # without our metadata file only the tensors can tell
                if dist.get_rank() == 0:
                    (root / "iter_0000001" / "rlsd_checkpoint.json").unlink()
                dist.barrier()
            try:
                load_checkpoint(root, chunks(model), **kwargs)
            except CheckpointError as exc:
                messages[case] = str(exc)
    return messages


def test_mismatched_checkpoint_gives_clear_errors_on_every_rank(dist_pool, tmp_path):
    per_rank = dist_pool(4).run(mismatched_loads, tmp_path)
    assert all(messages == per_rank[0] for messages in per_rank)
    messages = per_rank[0]
    assert "ffn_hidden_size: checkpoint 64, model 128" in messages["config"]
    assert "Global shape mismatch" in messages["tensors"] and "linear_fc1" in messages["tensors"]
    assert "it lacks ['decoder.layers.self_attention.linear_qkv.bias']" in messages["lacking"]


# ---------------------------------------------------------------------------------------------
# Directory helpers (no processes)


def test_directory_resolution_and_metadata_errors(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        resolve_checkpoint_dir(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "release"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path)
    release = tmp_path / "release"
    release.mkdir()
    (release / "rlsd_checkpoint.json").write_text(json.dumps({"format_version": 99, "model": {}}))
    with pytest.raises(CheckpointError, match=r"missing metadata.json, .metadata.*interrupted"):
        resolve_checkpoint_dir(tmp_path)
    (release / "metadata.json").write_text("{}")
    (release / ".metadata").write_bytes(b"")
    assert resolve_checkpoint_dir(tmp_path) == release
    with pytest.raises(CheckpointError, match="format_version=99, this rlsd_megatron reads version 1"):
        read_checkpoint_info(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("abc")
    with pytest.raises(CheckpointError, match="expected an iteration number"):
        latest_checkpoint(tmp_path)
