#!/usr/bin/env python
"""Megatron torch_dist checkpoint (any TP/PP) → Hugging Face directory for transformers / SGLang.

    python tools/convert_megatron_to_hf.py --ckpt runs/rlsd/checkpoints --out hf/step100 --dtype bf16
    python tools/convert_megatron_to_hf.py --ckpt ckpt/qwen3-8b/release --out hf/qwen3-8b-fp8 --fp8   # GPU + modelopt

--ckpt is a checkpoint root (its tracker's latest iteration is exported) or one iteration
directory. Writes config.json, model-0000k-of-0000n.safetensors + model.safetensors.index.json
and the tokenizer files (from the checkpoint's hf_assets/, or --tokenizer). The architecture
comes from the checkpoint's rlsd_checkpoint.json, or --hf-config for Megatron-LM checkpoints.
One process reads one layer at a time; memory is a layer plus one output shard.
"""

from __future__ import annotations

import argparse
import sys

from rlsd_megatron.checkpoint.convert import convert_megatron_to_hf
from rlsd_megatron.checkpoint.directory import CheckpointError
from rlsd_megatron.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint root or iteration directory")
    parser.add_argument("--out", required=True, help="HF output directory (must be new or empty)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="dtype of the exported weights (auto: as stored)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB")
    parser.add_argument("--hf-config", default=None, help="config.json describing the model (checkpoints without rlsd_checkpoint.json)")
    parser.add_argument("--tokenizer", default=None, help="directory to copy tokenizer files from (default: the checkpoint's hf_assets/)")
    parser.add_argument("--fp8", action="store_true", help="export FP8 (E4M3) weights with NVIDIA ModelOpt (GPU, [gpu] extra)")
    parser.add_argument("--calib-file", default=None, help="--fp8 calibration text, one sample per line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        convert_megatron_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                               hf_config=args.hf_config, tokenizer_dir=args.tokenizer, fp8=args.fp8,
                               calib_file=args.calib_file, progress=not args.no_progress)
    except (CheckpointError, ConfigError, ImportError) as exc:  # ImportError: --fp8 without modelopt
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
