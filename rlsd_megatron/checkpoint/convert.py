"""Hugging Face ⇄ Megatron (torch_dist) checkpoint conversion, streamed tensor by tensor.

`convert_hf_to_megatron` validates the HF config (`models.hf_config`), the parallel layout
and every tensor name and shape before writing anything, then streams safetensors through
`models.hf_mapping.hf_to_megatron` into a torch_dist checkpoint (`checkpoint.streaming`).
`convert_megatron_to_hf` streams a checkpoint saved at any TP/PP back through
`megatron_to_hf` into sharded safetensors with `config.json` and the tokenizer files.

Both run in one process and only global rank 0 does I/O (other ranks of a larger world, e.g. a
test pool, only join the TP=1/PP=1 process groups). See `tools/convert_*.py` for the CLIs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from rlsd_megatron.checkpoint.directory import (
    HF_ASSETS_DIR,
    CheckpointError,
    CheckpointInfo,
    model_config_from_hf_config,
    partial_dir,
    publish,
    read_checkpoint_info,
    resolve_checkpoint_dir,
    write_info,
)
from rlsd_megatron.checkpoint.hf_files import (
    HFSafetensors,
    copy_tokenizer_files,
    parse_size,
    plan_shards,
    write_safetensors_shards,
)
from rlsd_megatron.checkpoint.streaming import (
    export_order,
    read_canonical_tensors,
    stored_dtype,
    write_canonical_checkpoint,
)
from rlsd_megatron.config import Config, ConfigError, ModelConfig, ParallelConfig
from rlsd_megatron.dtypes import FLOAT_TYPES, dtype_name, of_torch, torch_dtype
from rlsd_megatron.models.hf_mapping import check_hf_names, expected_hf_shapes, hf_to_megatron, megatron_to_hf, name_pairs
from rlsd_megatron.models.vision_config import loaded_hf_name, saved_hf_name

# Non-architecture keys of the source config.json worth keeping on export.
_PRESERVED_HF_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@contextlib.contextmanager
def converter_world():
    """A TP=1/PP=1 megatron parallel state over the current world (one gloo process when none
    is initialised); yields whether this rank does the I/O."""
    from rlsd_megatron.parallel.state import init_distributed, model_parallel

    if not dist.is_initialized():
        init_distributed(backend="gloo")
    with model_parallel(tp=1, pp=1):
        yield dist.get_rank() == 0


def _tqdm(total: int, enabled: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# HF → Megatron


def validate_hf_checkpoint(hf_dir: Path, tp: int, pp: int, vpp: int | None) -> tuple[ModelConfig, HFSafetensors]:
    """The model config of an HF directory and its opened weights, after checking the config
    translates exactly, the layout divides the model, and every tensor name and shape matches."""
    from rlsd_megatron.config_checks import layout_problems
    from rlsd_megatron.models.hf_config import model_fields_from_hf

    model = ModelConfig(**model_fields_from_hf(hf_dir))
    # Sequence parallelism (which megatron-core requires of MoE under TP) does not change the files.
    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp, sequence_parallel=bool(model.num_experts) and tp > 1)
    problems = layout_problems(Config(model=model, parallel=parallel), tp * pp)
    if problems:
        raise ConfigError(f"--tp {tp} --pp {pp} does not fit {hf_dir}:\n  " + "\n  ".join(problems))
    weights = HFSafetensors(hf_dir, rename=functools.partial(loaded_hf_name, model))
    check_hf_names(weights.names(), model)
    bad = [f"{name}: {weights.shape(name)} (config implies {shape})"
           for name, shape in expected_hf_shapes(model).items() if weights.shape(name) != shape]
    if bad:
        raise CheckpointError(f"HF tensors of {hf_dir} do not match its config.json: " + "; ".join(bad[:8]))
    return model, weights


def megatron_lm_args(model: ModelConfig, *, tp: int, pp: int, vpp: int | None, dtype: torch.dtype, load: str) -> list[str]:
    """Megatron-LM (pretrain_gpt.py) arguments describing the model of a converted checkpoint."""
    args = [f"--tensor-model-parallel-size {tp}", f"--pipeline-model-parallel-size {pp}"]
    if vpp:
        args.append(f"--num-layers-per-virtual-pipeline-stage {model.num_layers // (pp * vpp)}")
    args += [
        "--use-mcore-models", f"--num-layers {model.num_layers}", f"--hidden-size {model.hidden_size}",
        f"--ffn-hidden-size {model.ffn_hidden_size}", f"--num-attention-heads {model.num_attention_heads}",
    ]
    if model.num_query_groups:
        args += ["--group-query-attention", f"--num-query-groups {model.num_query_groups}"]
    if model.kv_channels:
        args.append(f"--kv-channels {model.kv_channels}")
    args += [f"--max-position-embeddings {model.max_position_embeddings}", "--position-embedding-type rope",
             f"--rotary-base {int(model.rope_theta)}"]
    if model.rope_scaling_factor is not None:
        args += ["--use-rope-scaling", f"--rope-scaling-factor {model.rope_scaling_factor:g}"]
    args += ["--normalization RMSNorm", f"--norm-epsilon {model.norm_epsilon:g}", "--swiglu", "--disable-bias-linear"]
    if model.qkv_bias:
        args.append("--add-qkv-bias")
    if model.qk_layernorm:
        args.append("--qk-layernorm")
    if model.num_experts:
        args += moe_lm_args(model)
    if not model.tie_word_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    args += [
        f"--make-vocab-size-divisible-by {model.make_vocab_size_divisible_by}",
        "--attention-dropout 0.0", "--hidden-dropout 0.0",
        "--tokenizer-type HuggingFaceTokenizer", f"--tokenizer-model {load}/release/{HF_ASSETS_DIR}",
        f"--load {load}", "--ckpt-format torch_dist", "--finetune", "--no-load-optim", "--no-load-rng",
    ]
    if dtype is torch.bfloat16:
        args.append("--bf16")
    elif dtype is torch.float16:
        args.append("--fp16")
    return args


def moe_lm_args(model: ModelConfig) -> list[str]:
    """Megatron-LM's MoE arguments for a Qwen3-MoE / Qwen2-MoE model (the options `families.qwen3_moe`
    and `families.qwen2_moe` give megatron-core). The checkpoint does not depend on the expert-parallel size: add
    `--expert-model-parallel-size` for the run's layout."""
    from rlsd_megatron.models.families.qwen3_moe import expert_width

    args = [f"--num-experts {model.num_experts}", f"--moe-router-topk {model.moe_router_topk}",
            f"--moe-ffn-hidden-size {expert_width(model)}", "--moe-router-score-function softmax"]
    if not model.moe_norm_topk_prob:
        args.append("--moe-router-pre-softmax")
    if model.moe_shared_expert_intermediate_size:
        args += [f"--moe-shared-expert-intermediate-size {model.moe_shared_expert_intermediate_size}",
                 "--moe-shared-expert-gate"]
    if model.moe_aux_loss_coeff > 0:
        return args + ["--moe-router-load-balancing-type aux_loss",
                       f"--moe-aux-loss-coeff {model.moe_aux_loss_coeff:g}"]
    return args + ["--moe-router-load-balancing-type none"]


def mapping_table(model: ModelConfig, layout: dict) -> list[str]:
    """One line per checkpoint tensor: torch_dist key [layer], its shape, the rule and the HF
    tensors it comes from (layer 0 stands for every layer)."""
    shapes = expected_hf_shapes(model)
    lines = []
    for meg, hf_names, kind in name_pairs(model):
        layered = meg.startswith("decoder.layers.")
        expert = ".mlp.experts.local_experts." in meg
        if (layered and not meg.startswith("decoder.layers.0.")) or (expert and ".local_experts.0." not in meg):
            continue
        entry = layout[meg]
        shape = tuple(entry.data.shape)
        padded = " (vocab padded)" if getattr(entry, "allow_shape_mismatch", False) else ""
        sources = " + ".join(f"{n} {shapes[n]}" for n in hf_names)
        index = "[0, 0]" if expert else "[0]" if layered else ""
        lines.append(f"{entry.key}{index} {shape}{padded}  <-  {kind}: {sources}")
    if model.num_layers > 1:
        lines.append(f"(layers 1..{model.num_layers - 1} like layer 0: decoder.layers.* keys stack layers on a first axis)")
    if model.num_experts:
        lines.append(f"(experts 1..{model.num_experts - 1} like expert 0: expert keys stack the global expert number "
                     "on a second axis, whatever the expert-parallel size)")
    return lines


def convert_hf_to_megatron(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                           dtype: str = "auto", dry_run: bool = False, progress: bool = True,
                           log: Callable[[str], None] = print) -> Path | None:
    """Convert an HF Llama/Qwen2/Qwen3/Qwen3-MoE/Qwen2-MoE/Qwen2.5-VL/Qwen3-VL directory into the checkpoint root `out`
    (`out/release/` + tracker), padded for and checked against `--tp/--pp`; returns the
    release directory (None for a dry run or on ranks other than 0)."""
    hf_dir, out = Path(hf_dir), Path(out)
    model, weights = validate_hf_checkpoint(hf_dir, tp, pp, vpp)
    if dtype == "auto":
        stored = Counter(weights.dtype(n) for n in expected_hf_shapes(model))
        target = stored.most_common(1)[0][0]
    elif dtype in FLOAT_TYPES:
        target = torch_dtype(dtype)
    else:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(FLOAT_TYPES)}")
    # Megatron-LM's pretrain_gpt.py has no vision-language model: no arguments to print for one.
    lm_args = megatron_lm_args(model, tp=tp, pp=pp, vpp=vpp, dtype=target, load=str(out)) if model.vision is None else []
    with converter_world() as writes:
        if not writes:
            return None
        from rlsd_megatron.checkpoint.streaming import meta_layout

        if dry_run:
            layout = meta_layout(model, dtype=target, vocab_tp=tp)
            log(f"{hf_dir}: {model.family}, {model.num_layers} layers, hidden {model.hidden_size}, "
                f"vocab {model.vocab_size}, dtype {dtype_name(target)}; checks passed")
            for line in mapping_table(model, layout):
                log(line)
            if lm_args:
                log("Megatron-LM arguments:\n  " + " \\\n  ".join(lm_args))
            return None
        partial = partial_dir(out, "release")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        bar = _tqdm(len(name_pairs(model)), progress, "tensor")

        def advance(name: str) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)

        peak = write_canonical_checkpoint(partial, model, hf_to_megatron(weights.__getitem__, model), dtype=target,
                                          vocab_tp=tp, common={"iteration": 0}, on_tensor=advance)
        bar.close()
        assets = partial / HF_ASSETS_DIR
        assets.mkdir()
        copied = copy_tokenizer_files(hf_dir, assets)
        shutil.copy2(hf_dir / "config.json", assets / "config.json")
        if lm_args:
            (partial / "megatron_lm_args.txt").write_text(" \\\n".join(lm_args) + "\n")
        write_info(partial, CheckpointInfo(
            model=dataclasses.asdict(model), iteration=0, release=True, layout={"tp": tp, "pp": pp, "vpp": vpp},
            params_dtype=dtype_name(target), source={"hf_dir": str(hf_dir.resolve()), "tokenizer_files": copied},
        ))
        final = out / "release"
        publish(partial, final, tracker_value="release")
        log(f"wrote {final} ({len(name_pairs(model))} tensors, at most {peak} held at once); tokenizer files: "
            f"{', '.join(copied) or 'none found'}")
        if lm_args:
            log("Megatron-LM arguments (also in megatron_lm_args.txt):\n  " + " \\\n  ".join(lm_args))
        return final


# ---------------------------------------------------------------------------------------------
# Megatron → HF


def _export_config(model: ModelConfig, dtype: torch.dtype, assets: Path | None) -> dict:
    from rlsd_megatron.models.hf_config import hf_config_from_model

    preserved = {}
    if assets is not None and (assets / "config.json").is_file():
        source = json.loads((assets / "config.json").read_text())
        preserved = {k: source[k] for k in _PRESERVED_HF_KEYS if k in source}
    return hf_config_from_model(model, torch_dtype=of_torch(dtype).hf_name, **preserved)


def convert_megatron_to_hf(ckpt: str | Path, out: str | Path, *, dtype: str = "auto", max_shard_size: str | int = "2GB",
                           hf_config: str | Path | None = None, tokenizer_dir: str | Path | None = None,
                           fp8: bool = False, calib_file: str | Path | None = None, progress: bool = True,
                           log: Callable[[str], None] = print) -> Path | None:
    """Export a checkpoint (root or iteration directory, saved at any TP/PP) to an HF directory
    `out`: config.json, sharded safetensors + index, tokenizer files. With `fp8`, the bf16
    export is quantised to FP8 by nvidia-modelopt (see `fp8_export`)."""
    out = Path(out)
    checkpoint_dir = resolve_checkpoint_dir(ckpt)
    model = model_config_from_hf_config(hf_config) if hf_config else read_checkpoint_info(checkpoint_dir).model_config()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output directory {out} is not empty; choose a new one or remove it")
    if dtype != "auto" and dtype not in FLOAT_TYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(FLOAT_TYPES)}")
    assets = Path(tokenizer_dir) if tokenizer_dir else checkpoint_dir / HF_ASSETS_DIR
    if fp8:
        from rlsd_megatron.checkpoint.fp8_export import import_modelopt

        import_modelopt()  # fail before the bf16 export, not after
    with converter_world() as writes:
        if not writes:
            return None
        target = stored_dtype(checkpoint_dir) if dtype == "auto" else torch_dtype(dtype)
        if fp8 and target is torch.float32:
            target = torch.bfloat16  # modelopt quantises from bf16; fp32 would only double the temp files
        kinds = {meg: (hf, kind) for meg, hf, kind in name_pairs(model)}
        shapes = expected_hf_shapes(model)
        itemsize = torch.empty((), dtype=target).element_size()
        sizes = [(saved_hf_name(model, n), itemsize * torch.Size(shapes[n]).numel())
                 for meg in export_order(model) for n in kinds[meg][0]]
        shards = plan_shards(sizes, parse_size(max_shard_size))
        bar = _tqdm(len(kinds), progress, "tensor")

        def hf_tensors():
            for name, tensor in read_canonical_tensors(checkpoint_dir, model):
                bar.set_postfix_str(name, refresh=False)
                bar.update(1)
                for hf_name, piece in megatron_to_hf(name, tensor, model, kinds):
                    yield saved_hf_name(model, hf_name), piece.to(target)

        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write_safetensors_shards(partial, hf_tensors(), shards)
        bar.close()
        (partial / "config.json").write_text(json.dumps(_export_config(model, target, assets), indent=2) + "\n")
        copied = copy_tokenizer_files(assets, partial) if assets.is_dir() else []
        if not copied:
            log(f"warning: no tokenizer files in {assets}; pass --tokenizer DIR to copy them")
        if fp8:
            from rlsd_megatron.checkpoint.fp8_export import export_fp8

            export_fp8(partial, out, calib_file=calib_file, max_shard_size=max_shard_size, log=log)
            shutil.rmtree(partial)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                out.rmdir()  # empty (checked above)
            partial.rename(out)
        log(f"wrote {out} ({len(shards)} safetensors shard(s), {dtype_name(target)}{', fp8' if fp8 else ''})")
        return out
