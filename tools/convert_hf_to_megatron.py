#!/usr/bin/env python
"""Hugging Face (Llama / Qwen2 / Qwen3 / Qwen2.5-VL / Qwen3-VL, safetensors) → Megatron torch_dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir /models/Qwen3-8B --out ckpt/qwen3-8b --tp 2 --pp 2
    python tools/convert_hf_to_megatron.py --hf-dir /models/Qwen3-8B --out ckpt/qwen3-8b --tp 2 --pp 2 --dry-run

Writes OUT/release/ (a megatron.core.dist_checkpointing checkpoint, the tokenizer files in
OUT/release/hf_assets/, rlsd_checkpoint.json, megatron_lm_args.txt) and the tracker
OUT/latest_checkpointed_iteration.txt (no Megatron-LM arguments for a vision-language model:
Megatron-LM's pretrain_gpt.py has none). One process streams tensor by tensor (memory: a few
tensors, never the model); the result loads at any TP/PP — --tp/--pp are checked against the
model and set the vocabulary padding and the printed Megatron-LM arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlsd_megatron.checkpoint.convert import convert_hf_to_megatron
from rlsd_megatron.checkpoint.directory import CheckpointError
from rlsd_megatron.config import ConfigError
from rlsd_megatron.models.hf_mapping import MappingError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint root to create (release/ is written inside)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is meant for")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the checkpoint is meant for")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (checked only)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="stored dtype (auto: as in the HF files)")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the mapping; write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/release checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not (Path(args.hf_dir) / "config.json").is_file():
        print(f"error: --hf-dir {args.hf_dir}: no config.json there (expected a Hugging Face model directory)",
              file=sys.stderr)
        return 2
    if (Path(args.out) / "release").exists() and not (args.overwrite or args.dry_run):
        print(f"error: --out {args.out} already holds a converted checkpoint (release/); pass --overwrite to "
              "replace it or choose another --out", file=sys.stderr)
        return 2
    try:
        convert_hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, dtype=args.dtype,
                               dry_run=args.dry_run, progress=not args.no_progress)
    except (CheckpointError, ConfigError, MappingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
