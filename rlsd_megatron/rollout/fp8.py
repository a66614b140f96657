"""FP8 rollout weights: the learner's weights quantised on their way to an FP8 engine (`rollout.fp8_weights`).

The format is the one DeepSeek-V3 and Qwen's `*-FP8` checkpoints use and SGLang loads with its
`Fp8Config` (`quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
"dynamic", "weight_block_size": [128, 128]}`): every weight of the attention and MLP projections
(q/k/v/o_proj, gate/up/down_proj) is float8_e4m3fn, in blocks of `weight_block_size` (rows x
columns) that each have one fp32 scale, stored next to it as `<module>.weight_scale_inv` with shape
[ceil(rows / b0), ceil(cols / b1)]; dequantised weight = fp8 value * scale_inv, scale_inv = block
amax / 448 (e4m3's largest value). Embeddings, lm_head, norms and biases stay as they are.
Activations are quantised by the engine itself at run time ("dynamic"), so the weights alone fix
everything a push has to send.

Error of one element: e4m3 has 3 mantissa bits, so rounding a scaled value q = w / scale_inv in
e4m3's normal range [2^-6, 448] moves it by at most half a spacing, 2^-4 |q|; below 2^-6
(subnormals, spacing 2^-9) by at most 2^-10. Hence |dequantised - w| <= max(2^-4 |w|,
2^-10 scale_inv) for every element (`tests/rollout/test_fp8.py` holds the quantiser to it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F

from rlsd_megatron.config import ConfigError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
DEFAULT_BLOCK = (128, 128)

# The HF linear layers SGLang builds as FP8 layers under `Fp8Config` (lm_head and embeddings are
# not linear layers there, norms and biases are not weights of one).
_QUANTISED_LINEAR = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


@dataclass(frozen=True)
class Fp8BlockConfig:
    """Block-wise FP8 of an engine's linear weights, as its config.json declares it."""

    block: tuple[int, int] = DEFAULT_BLOCK  # (rows, columns) of the weight per scale
    ignored_layers: tuple[str, ...] = ()  # module paths left unquantised, without the "model." prefix


def fp8_block_quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, Any]:
    """The `quantization_config` entry of a config.json that declares this format."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


def quantize_fp8_blockwise(weight: torch.Tensor,
                           block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scale_inv [ceil(rows / b0), ceil(cols / b1)]) of a 2-D weight.

    Computed in fp32. Edge blocks cover what is left of the weight. An all-zero block gets
    scale_inv 1 (any positive value dequantises its zeros exactly; amax / 448 = 0 would divide by 0).
    """
    if weight.dim() != 2:
        raise ValueError(f"block-wise FP8 quantises 2-D weights, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    grid = fp8_scale_shape((rows, cols), block)
    padded = F.pad(weight.float(), (0, grid[1] * block[1] - cols, 0, grid[0] * block[0] - rows))
    blocks = padded.view(grid[0], block[0], grid[1], block[1])
    scale_inv = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    scale_inv = torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))
    blocks.div_(scale_inv[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)  # fp32 rounding may pass 448 by an ulp
    return padded[:rows, :cols].to(FP8_DTYPE), scale_inv


def dequantize_fp8_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor,
                             block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """The fp32 weight an FP8 engine computes with: fp8 value * its block's scale_inv."""
    rows, cols = weight.shape
    scale = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return weight.float() * scale


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale_inv of a weight of `shape`: one per block, edge blocks included."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def scale_inv_name(weight_name: str) -> str:
    """`...q_proj.weight` → `...q_proj.weight_scale_inv`."""
    return weight_name.removesuffix("weight") + "weight_scale_inv"


def is_fp8_weight(name: str, fp8: Fp8BlockConfig) -> bool:
    """Whether the HF tensor `name` is pushed as FP8: a projection weight not under an ignored
    module (matched on whole dotted path components, as SGLang's `is_layer_skipped` does)."""
    if not _QUANTISED_LINEAR.search(name):
        return False
    module = "." + name.removesuffix(".weight").removeprefix("model.") + "."
    return not any(f".{ignored}." in module for ignored in fp8.ignored_layers)


def fp8_rollout_specs(specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                      fp8: Fp8BlockConfig) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of what `fp8_rollout_tensors` yields for tensors of these specs (for
    planning buckets before any data moves)."""
    for name, shape, dtype in specs:
        if is_fp8_weight(name, fp8):
            yield name, tuple(shape), FP8_DTYPE
            yield scale_inv_name(name), fp8_scale_shape(shape, fp8.block), torch.float32
        else:
            yield name, tuple(shape), dtype


def fp8_rollout_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]],
                        fp8: Fp8BlockConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) pairs as an FP8 engine loads them: each quantised weight replaced by
    its fp8 tensor followed by its `weight_scale_inv`, everything else unchanged, in order."""
    for name, tensor in named_tensors:
        if is_fp8_weight(name, fp8):
            weight, scale_inv = quantize_fp8_blockwise(tensor, fp8.block)
            yield name, weight
            yield scale_inv_name(name), scale_inv
        else:
            yield name, tensor


_BLOCK_FP8_HINT = (
    "Start the engine from an FP8 block-quantised checkpoint of the same model — quantization_config "
    f"{fp8_block_quantization_config()}, the format of DeepSeek-V3 and of Qwen's *-FP8 releases (e.g. "
    "Qwen/Qwen3-8B-FP8 for Qwen/Qwen3-8B): set model.hf_config to it. Without model.hf_config the engine "
    "starts from a config.json we write, which declares this format."
)


def fp8_quant_config(hf_config: dict[str, Any], *, fp8_weights: bool) -> Fp8BlockConfig | None:
    """The FP8 format pushes to an engine built from `hf_config` (its config.json) must have: None
    for an unquantised engine. Raises ConfigError, saying what to do, when `fp8_weights`
    (rollout.fp8_weights) and the engine's quantisation disagree or the format cannot be pushed."""
    quantization = hf_config.get("quantization_config")
    if not quantization:
        if fp8_weights:
            raise ConfigError(
                "rollout.fp8_weights=true, but the engine's config.json has no quantization_config: SGLang "
                "builds FP8 layers (float8 weight + weight_scale_inv) only where the checkpoint's config declares "
                f"them. {_BLOCK_FP8_HINT} Or set rollout.fp8_weights=false."
            )
        return None
    if not fp8_weights:
        raise ConfigError(
            f"the engine's checkpoint is quantised ({_describe(quantization)}) but rollout.fp8_weights=false: the "
            "weight sync would push the learner's unquantised tensors into its quantised parameters. Set "
            "rollout.fp8_weights=true (FP8 block-quantised checkpoints) or start the engine from the unquantised "
            "checkpoint."
        )
    return _block_fp8_config(quantization)


def _describe(quantization: dict[str, Any]) -> str:
    return ", ".join(f"{key}={quantization[key]!r}" for key in ("quant_method", "quant_algo", "weight_block_size")
                     if key in quantization)


def _block_fp8_config(quantization: dict[str, Any]) -> Fp8BlockConfig:
    method = str(quantization.get("quant_method", "")).lower()
    what = f"the engine's checkpoint is quantised with {_describe(quantization)}"
    if method.startswith("modelopt") or "quant_algo" in quantization:
        raise ConfigError(
            f"{what} (NVIDIA ModelOpt). ModelOpt FP8 is per-tensor with static activation scales (input_scale) "
            "calibrated on data for the weights the checkpoint was made from: a push can recompute weight scales "
            "from the new weights, but not activation scales, which need a calibration pass over activations, and "
            "stale ones clip or waste FP8 range as the policy moves away from the calibrated weights. "
            "rollout.fp8_weights pushes block-wise FP8 with dynamic activation scales, which the weights alone "
            f"determine. {_BLOCK_FP8_HINT}"
        )
    if method != "fp8":
        raise ConfigError(f"{what}; rollout.fp8_weights pushes block-wise FP8 (quant_method 'fp8' with "
                          f"weight_block_size), which it cannot receive. {_BLOCK_FP8_HINT}")
    block = quantization.get("weight_block_size")
    scheme = quantization.get("activation_scheme")
    if block is None:
        raise ConfigError(
            f"{what} and no weight_block_size: per-tensor FP8 (activation_scheme={scheme!r}). After loading, "
            "SGLang requantises the q/k/v and gate/up shards of its fused layers to their largest scale, and a "
            "static activation scheme needs input scales calibrated on data, which a push cannot produce. "
            f"rollout.fp8_weights pushes block-wise FP8 only. {_BLOCK_FP8_HINT}"
        )
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"{what}: weight_block_size must be two positive integers [rows, columns], got {block!r}")
    if scheme != "dynamic":
        raise ConfigError(f"{what} and activation_scheme={scheme!r}: block-wise FP8 needs dynamic activation "
                          "scales (static ones are calibrated on data, which a push cannot redo)")
    if quantization.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{what} and fmt={quantization['fmt']!r}: rollout.fp8_weights pushes e4m3 weights")
    if quantization.get("scale_fmt") is not None:
        raise ConfigError(f"{what} and scale_fmt={quantization['scale_fmt']!r}: rollout.fp8_weights pushes fp32 "
                          "scales of block amax / 448, not power-of-two (UE8M0) or other encoded ones")
    ignored = quantization.get("ignored_layers") or quantization.get("modules_to_not_convert") or ()
    return Fp8BlockConfig(block=(block[0], block[1]),
                          ignored_layers=tuple(layer.removeprefix("model.").rstrip(".") for layer in ignored))
