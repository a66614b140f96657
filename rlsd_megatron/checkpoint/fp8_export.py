"""FP8 (E4M3, per-tensor scales) serving checkpoints via NVIDIA ModelOpt.

Takes an exported bf16 HF directory, calibrates activation ranges with a few forward passes
(`mtq.FP8_DEFAULT_CFG`), and writes ModelOpt's unified HF checkpoint (FP8 weights with scales
and a `quantization_config` in config.json) that SGLang serves with `--quantization modelopt`
(recent SGLang detects it from config.json). Needs the `gpu` extra (nvidia-modelopt); a CUDA
GPU is used when present, calibration on CPU works for tiny models only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from rlsd_megatron.checkpoint.hf_files import copy_tokenizer_files

# Generic calibration text used when no --calib-file is given: FP8 per-tensor scales only need
# typical activation magnitudes, but real in-domain prompts (e.g. the RL prompts) are better.
_DEFAULT_CALIBRATION = [
    "The quick brown fox jumps over the lazy dog.",
    "Solve for x: 3x + 7 = 22. First subtract 7 from both sides, then divide by 3.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "In 1905 Albert Einstein published four papers that changed physics.",
    "Question: What is 17 * 23? Answer: 17 * 23 = 391.",
]


def import_modelopt():
    """(mtq, export_hf_checkpoint) of NVIDIA ModelOpt, or an ImportError saying how to install it."""
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError as exc:
        raise ImportError(
            f"--fp8 export needs NVIDIA ModelOpt ({exc}); install the GPU extra: pip install -e '.[gpu]' "
            f"(nvidia-modelopt==0.47.0)"
        ) from None
    return mtq, export_hf_checkpoint


def calibration_batches(hf_dir: Path, calib_file: str | Path | None, vocab_size: int, max_len: int = 256) -> list[torch.Tensor]:
    """Token-id batches [1, T]: lines of `calib_file` (or built-in text) through the exported
    tokenizer; random token ids when the export has no tokenizer."""
    texts = Path(calib_file).read_text().splitlines() if calib_file else _DEFAULT_CALIBRATION
    texts = [t for t in texts if t.strip()][:512]
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        return [tokenizer(t, return_tensors="pt", truncation=True, max_length=max_len).input_ids for t in texts]
    except (OSError, ValueError):
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, 64), generator=gen) for _ in texts]


def export_fp8(bf16_dir: str | Path, out: str | Path, *, calib_file: str | Path | None = None,
               max_shard_size: str | int = "2GB", log: Callable[[str], None] = print) -> Path:
    """Quantise the HF model in `bf16_dir` to FP8 with ModelOpt and export it to `out`."""
    mtq, export_hf_checkpoint = import_modelopt()
    from transformers import AutoModelForCausalLM

    bf16_dir, out = Path(bf16_dir), Path(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(bf16_dir), dtype=torch.bfloat16).to(device).eval()
    batches = calibration_batches(bf16_dir, calib_file, model.config.vocab_size)

    def forward_loop(m):
        with torch.no_grad():
            for ids in batches:
                m(ids.to(device))

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out, max_shard_size=max_shard_size)
    copy_tokenizer_files(bf16_dir, out)
    log(f"FP8 (modelopt {mtq.__name__}) calibrated on {len(batches)} sequences on {device}")
    return out
