"""What ``rlsd-eval`` evaluates: a Megatron checkpoint (the trainer's or a converter's, saved at
any TP/PP) or a Hugging Face directory, turned into a rollout engine and a prompt renderer.

No learner is built and no process group beyond a world of one is needed: a checkpoint's weights
are streamed one layer at a time by ``checkpoint.streaming.read_canonical_tensors`` (which reads
any saved layout) through the single Megatron → HF name mapping (``models.hf_mapping``), exactly
as ``tools/convert_megatron_to_hf.py`` does, and written into the embedded engine's parameters.
SGLang loads an HF directory itself: a checkpoint is converted once into the output directory.
The tokenizer and prompt format come from the run that wrote the checkpoint: its built-in task
(``data.task``, e.g. the CPU demo's character tokenizer) or a chat tokenizer directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from rlsd_megatron.checkpoint.directory import (HF_ASSETS_DIR, CheckpointError, model_config_from_hf_config,
                                                read_checkpoint_info, resolve_checkpoint_dir)
from rlsd_megatron.config import ModelConfig, VisionConfig

if TYPE_CHECKING:
    from rlsd_megatron.data.images import ImageReader
    from rlsd_megatron.eval.benchmarks import BenchmarkSpec

__all__ = ["EvalModel", "Prompter", "build_engine", "build_prompter", "open_model"]


@dataclass
class EvalModel:
    """A model to evaluate. ``kind`` is ``megatron`` (``path`` is the checkpoint's iteration
    directory) or ``hf``; ``task`` the built-in task of the run that wrote it (None for prompt
    files); ``tokenizer_dir`` the chat tokenizer's directory when there is no task."""

    path: Path
    kind: str
    model: ModelConfig
    task: str | None
    tokenizer_dir: Path | None

    def hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights as HF-named tensors, a layer at a time (stored dtype)."""
        if self.kind == "hf":
            import functools

            from rlsd_megatron.checkpoint.hf_files import HFSafetensors
            from rlsd_megatron.models.vision_config import loaded_hf_name

            # A VL checkpoint's files may name tensors as saved (`visual.*`): the engine's are module names.
            weights = HFSafetensors(self.path, rename=functools.partial(loaded_hf_name, self.model))
            for name in sorted(weights.names()):
                yield name, weights[name]
            return
        from rlsd_megatron.checkpoint.convert import converter_world
        from rlsd_megatron.checkpoint.streaming import read_canonical_tensors
        from rlsd_megatron.models.hf_mapping import megatron_to_hf, name_pairs

        kinds = {meg: (hf, kind) for meg, hf, kind in name_pairs(self.model)}
        with converter_world():
            for name, tensor in read_canonical_tensors(self.path, self.model):
                yield from megatron_to_hf(name, tensor, self.model, kinds)

    def hf_directory(self, work_dir: Path, log: Callable[[str], None] = print) -> Path:
        """An HF directory of these weights (for SGLang): ``path`` itself, or a conversion written
        once to ``work_dir/hf_model`` (reused by a resumed evaluation)."""
        if self.kind == "hf":
            return self.path
        out = work_dir / "hf_model"
        if not (out / "config.json").is_file():
            from rlsd_megatron.checkpoint.convert import convert_megatron_to_hf

            convert_megatron_to_hf(self.path, out, tokenizer_dir=self.tokenizer_dir, progress=False, log=log)
        return out


def open_model(path: str | Path, *, tokenizer_dir: str | Path | None = None) -> EvalModel:
    """The model at ``path``: an HF directory (``config.json`` + safetensors) or a Megatron
    checkpoint root / iteration directory with ``rlsd_checkpoint.json``. ``tokenizer_dir``
    overrides the tokenizer the checkpoint names (its ``hf_assets``, else the training config's
    ``data.tokenizer_dir``)."""
    path = Path(path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return EvalModel(path, "hf", model_config_from_hf_config(path), None, Path(tokenizer_dir or path))
    try:
        checkpoint_dir = resolve_checkpoint_dir(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. rlsd-eval --model takes a Megatron checkpoint (a trainer's checkpoint.dir or "
                              f"warm_start.output, a converter's output) or an HF directory with config.json and "
                              f"*.safetensors.") from None
    info = read_checkpoint_info(checkpoint_dir)
    data = (info.config or {}).get("data", {})
    task = data.get("task")
    if tokenizer_dir is None and not task:
        assets = checkpoint_dir / HF_ASSETS_DIR
        tokenizer_dir = assets if assets.is_dir() else data.get("tokenizer_dir")
    return EvalModel(checkpoint_dir, "megatron", info.model_config(), task,
                     Path(tokenizer_dir) if tokenizer_dir else None)


@dataclass
class Prompter:
    """How a benchmark's user text becomes prompt ids and sampled ids become text:
    ``render(user_text) -> ids``, ``decode(ids) -> str``, ``stop_token_ids``. A vision-language
    model's also has ``vision`` (its ``model.vision``; ``render`` then turns each ``<image>`` of
    the text into one image placeholder token, as training prompts do) and ``processor_dir``
    (the folder of its ``preprocessor_config.json``: the model's own image processor settings)."""

    render: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    stop_token_ids: list[int]
    vision: VisionConfig | None = None
    processor_dir: Path | None = None

    def image_reader(self, spec: "BenchmarkSpec") -> "ImageReader | None":
        """The reader of ``spec``'s images for this model (its processor, the benchmark's pixel
        bounds); None for a text benchmark. Raises ValueError for an image benchmark on a model
        whose prompts take no images."""
        if spec.image_key is None:
            return None
        if self.vision is None:
            raise ValueError(f"benchmark {spec.name!r} has images (image_key={spec.image_key!r}) but the model's "
                             "prompts take none (a text-only model, or a built-in task's prompt format); evaluate a "
                             "vision-language model with its chat tokenizer, or remove image_key.")
        from rlsd_megatron.data.images import ImageReader

        return ImageReader(self.vision, spec.image_settings(),
                           str(self.processor_dir) if self.processor_dir is not None else None)

    def prompt(self, user_text: str, images: "ImageReader | None" = None, entries: Sequence[Any] = (),
               base_dir: Path = Path(".")) -> tuple[list[int], Any]:
        """The prompt ids of ``user_text`` and its ``ImageInputs`` (None without images): each
        image of ``entries`` processed by ``images`` and its placeholder token repeated once per
        image embedding (``data.images.expand_image_tokens``), as in a training prompt."""
        ids = list(self.render(user_text))
        if self.vision is None:
            return ids, None
        from rlsd_megatron.data.images import expand_image_tokens, image_token_counts

        inputs = images.inputs(entries, base_dir) if entries else None
        counts = image_token_counts(inputs.image_grid_thw, self.vision.spatial_merge_size) if inputs else []
        # Also for a text row: a stray <image> in its text (no image to fill it) is refused here.
        return expand_image_tokens(ids, counts, self.vision.image_token_id), inputs


def build_prompter(model: EvalModel, *, system_prompt: str | None = None) -> Prompter:
    """The built-in task's prompt format and tokenizer when the checkpoint's run used one (no
    system prompt possible there), else the chat template of ``model.tokenizer_dir`` (with
    ``<image>`` placeholders and the model's image processor for a vision-language model)."""
    if model.task:
        from rlsd_megatron.data.build import BUILTIN_TASKS

        if system_prompt:
            raise ValueError(f"the model was trained on the built-in task {model.task!r}, whose prompts have no "
                             f"system turn; remove system_prompt from the benchmark.")
        dataset = BUILTIN_TASKS[model.task]("train")
        return Prompter(dataset.render_prompt, dataset.decode, [dataset.eos_id])
    from rlsd_megatron.data.teacher_context import hf_chat_renderer
    from rlsd_megatron.data.tokenizer import load_chat_tokenizer

    if model.tokenizer_dir is None:
        raise ValueError(f"{model.path} names no tokenizer (no hf_assets, no data.tokenizer_dir in its training "
                         f"config); pass --tokenizer DIR (the model's HF directory works).")
    from rlsd_megatron.data.images import IMAGE_PLACEHOLDER

    tokenizer = load_chat_tokenizer(model.tokenizer_dir)
    vision = model.model.vision
    render = hf_chat_renderer(tokenizer, system_prompt=system_prompt,
                              image_placeholder=IMAGE_PLACEHOLDER if vision is not None else None)
    return Prompter(render, lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
                    [tokenizer.eos_token_id], vision=vision,
                    processor_dir=model.tokenizer_dir if vision is not None else None)


def build_engine(model: EvalModel, backend: str, *, engines: int = 1, engine_tp: int = 1, work_dir: Path,
                 mem_fraction_static: float = 0.8, deterministic: bool = False, log: Callable[[str], None] = print):
    """``engines`` rollout engines holding the model's weights, as one
    (:class:`~rlsd_megatron.rollout.data_parallel.DataParallelEngines` when more than one).
    ``backend``: ``embedded`` (CPU, weights copied in) or ``sglang`` (engine ``k`` on GPUs
    ``k·engine_tp …``, loading an HF directory; imported only here). SGLang honours the
    per-sample seeds only with ``deterministic`` (its deterministic-inference mode, slower)."""
    from rlsd_megatron.rollout.data_parallel import DataParallelEngines

    if backend == "embedded":
        from rlsd_megatron.rollout.embedded import EmbeddedEngine

        built = [EmbeddedEngine(model.model) for _ in range(engines)]
        targets = [engine.writable_weights() for engine in built]
        names = set()
        with torch.no_grad():
            for name, tensor in model.hf_tensors():
                if name not in targets[0]:
                    raise CheckpointError(f"{model.path} holds {name!r}, which the {model.model.family} engine model "
                                          f"does not have (it has e.g. {sorted(targets[0])[:3]}).")
                for target in targets:
                    target[name].copy_(tensor)
                names.add(name)
        for engine in built:
            engine.weights_written(names, version=0)
    elif backend == "sglang":
        from rlsd_megatron.rollout.sglang_engine import SGLangEngine

        hf_dir = str(model.hf_directory(work_dir, log=log))
        # A VL engine builds its multimodal processor from the processor files (the tokenizer's folder).
        processor = str(model.tokenizer_dir) if model.model.vision is not None and model.tokenizer_dir else None
        built = [SGLangEngine(model.model, model_path=hf_dir, engine_tp=engine_tp, base_gpu_id=k * engine_tp,
                              mem_fraction_static=mem_fraction_static, processor_path=processor,
                              server_args={"enable_deterministic_inference": True} if deterministic else None)
                 for k in range(engines)]
    else:
        raise ValueError(f"backend={backend!r}; expected embedded or sglang.")
    return built[0] if engines == 1 else DataParallelEngines(built)
