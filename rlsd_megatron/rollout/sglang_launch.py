"""What an SGLang engine is started from (`SGLangEngine.__init__`): the config.json it builds the
model from (checked against the learner's model, or written for a start without weights), the FP8
format its pushes must have, a VL model's processor folder and `<|vision_start|>` id, and a free
port for its NCCL group. Pinned to sglang==0.5.23 (`sglang_engine.py`'s docstring says why
each matters).
"""

from __future__ import annotations

import json
import random
import socket
import tempfile
from pathlib import Path
from typing import Any

from rlsd_megatron.config import ConfigError, ModelConfig
from rlsd_megatron.models.hf_mapping import MappingError, expected_hf_shapes
from rlsd_megatron.rollout.fp8 import Fp8BlockConfig, fp8_quant_config

SGLANG_VERSION = "0.5.23"


def check_hf_config(model_path: str | Path, model: ModelConfig) -> None:
    """Raise MappingError if the engine's config.json describes other tensors than `model`."""
    from rlsd_megatron.models.hf_config import model_fields_from_hf

    theirs = ModelConfig(**model_fields_from_hf(str(model_path)))
    ours, other = expected_hf_shapes(model), expected_hf_shapes(theirs)
    diff = sorted(n for n in set(ours) | set(other) if ours.get(n) != other.get(n))
    if diff:
        raise MappingError(
            f"the engine model at {model_path} does not match the learner's model config: "
            + ", ".join(f"{n}: engine {other.get(n)} vs learner {ours.get(n)}" for n in diff[:5])
        )


def engine_hf_config(model_path: str | Path) -> dict[str, Any]:
    """The config.json SGLang builds the engine from, with a ModelOpt `hf_quant_config.json` next to
    it (which SGLang also reads) as its quantization_config."""
    from rlsd_megatron.models.hf_config import read_hf_config

    config = read_hf_config(model_path)
    path = Path(model_path)
    modelopt = (path if path.is_dir() else path.parent) / "hf_quant_config.json"
    if not config.get("quantization_config") and modelopt.is_file():
        nested = json.loads(modelopt.read_text()).get("quantization", {})
        config["quantization_config"] = {"quant_method": "modelopt", **nested}
    return config


def engine_fp8_format(hf_config: dict[str, Any], fp8_weights: bool) -> Fp8BlockConfig | None:
    """The FP8 format pushes to an engine built from `hf_config` must have (`fp8.fp8_quant_config`),
    refusing Llama (see `sglang_engine`'s docstring)."""
    fp8 = fp8_quant_config(hf_config, fp8_weights=fp8_weights)
    if fp8 is not None and "LlamaForCausalLM" in hf_config.get("architectures", ()):
        raise ConfigError(
            f"rollout.fp8_weights=true does not work with Llama on sglang {SGLANG_VERSION}: its LlamaForCausalLM "
            "renames the pushed .weight_scale_inv tensors to .weight_scale, which block-FP8 layers do not have, "
            "so the scales would be dropped (sglang PR #30234). Use a Qwen2/Qwen3 model or rollout.fp8_weights=false."
        )
    return fp8


def vision_start_token_id(hf_config: dict[str, Any]) -> int:
    """`<|vision_start|>`'s id as SGLang reads it: config.json's, else transformers' default for the
    model type (SGLang builds its config with transformers' AutoConfig)."""
    import transformers

    return int(transformers.AutoConfig.for_model(**hf_config).vision_start_token_id)


def write_hf_config_dir(hf_config: dict[str, Any]) -> str:
    """A temporary model directory holding only `hf_config` as config.json (the engine starts with
    `load_format="dummy"` and gets its weights from the first sync)."""
    path = Path(tempfile.mkdtemp(prefix="rlsd_sglang_model_"))
    (path / "config.json").write_text(json.dumps(hf_config, indent=1))
    return str(path)


def free_port_below_ephemeral(low: int = 22000, high: int = 29999, attempts: int = 64) -> int:
    """A free TCP port for the engine's `nccl_port`, drawn from OS entropy. SGLang's own pick
    (`get_free_port_below_ephemeral`) samples with the process-global `random`, which every
    learner rank seeds alike, so engines started at the same moment on one node draw the same
    port and all but one fail to bind their TP store."""
    draw = random.SystemRandom()
    for port in draw.sample(range(low, high + 1), attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def processor_dir(model: ModelConfig, processor_path: str | None, model_path: str | None) -> str | None:
    """The directory SGLang builds a VL engine's multimodal processor from (`tokenizer_path`):
    `processor_path`, else the model directory; None for a text model. Raises ConfigError when
    it holds no image processor settings where transformers looks for them (`saved_image_processor`:
    a released model's `preprocessor_config.json`, or the `processor_config.json` transformers 5
    saves, with its settings under "image_processor"); see `sglang_requests`' docstring on images."""
    from rlsd_megatron.data.images import saved_image_processor

    if model.vision is None:
        return None
    for candidate in (processor_path, model_path):
        if candidate is None:
            continue
        folder = Path(candidate) if Path(candidate).is_dir() else Path(candidate).parent
        if saved_image_processor(str(folder))[0] is not None:
            return str(folder)
    raise ConfigError(
        f"a vision-language policy on the SGLang backend needs the model's processor files (preprocessor_config.json "
        f"and the tokenizer): sglang {SGLANG_VERSION} builds its multimodal processor even for preprocessed images; "
        f"none in data.tokenizer_dir={processor_path!r} or model.hf_config={model_path!r}. Point data.tokenizer_dir at "
        "the model's directory"
    )
