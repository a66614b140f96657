"""SGLang rollout engines (GPU): colocated with the learner, weights synced in memory.

Pinned to sglang==0.5.23 (`pip install -e .[gpu]`); `tests/rollout/test_sglang_contract.py`
checks every method, argument and request field used here against that release's source.

Layout. One `sglang.Engine` per rollout-TP group of GPUs (`engine_tp` GPUs starting at
`base_gpu_id`), created by the first rank of `group` — the learner ranks whose GPUs the engine
shares (colocated) — with `enable_memory_saver` so it can hand its memory to the learner
(`sleep`) and take it back (`wake`). Engine TP is independent of learner TP. One live engine per
process: 0.5.23 keeps one process-wide config (`runtime_context.publish`, "last-publish-wins") and
every `Engine` in a process runs on the same asyncio loop, so `DataParallelEngines` (one thread
per engine) cannot drive several SGLang engines in one process; across processes each engine's
host rank generates its own share (`prompt_offset` keeps the seeds).

Weight sync (colocated, `transport="ipc"`). Every rank of the group runs the resharding stream
(`rollout.resharding`) and so holds each bucket, full HF tensors on its own GPU. Per bucket:
each rank serialises its `{"flattened_tensor", "metadata"}` (a CUDA IPC handle, not the data)
with SGLang's `MultiprocessingSerializer`; the host gathers one payload per engine TP rank and
calls `update_weights_from_tensor(payloads, load_format="flattened_bucket", flush_cache=False)`;
its return (every engine TP rank has run `load_weights`) is the acknowledgement, broadcast to
the group; only then does each rank drop its bucket. A bucket is never written again after it
was shared — each one is a fresh allocation — and dropping it is safe because torch's CUDA IPC
reference counting keeps the block out of the caching allocator until the engine process has
released its handle, which it does only after synchronising its stream (torch
`StorageSharing.cpp`); `torch.cuda.ipc_collect()` returns those blocks at the end. Around the
buckets: pause generation (`TokenizerManager.pause_generation`; `Engine` has no such method),
`begin_weight_update` … `end_weight_update` (0.5.23 rejects tensor updates outside that
session), one `flush_cache`, continue generation.

Non-colocated (`transport="nccl"`): the host rank joins an NCCL group with the engine's ranks
(`init_weights_update_group`, rank 0 = us) and broadcasts each bucket's flat buffer while the
engine receives it with `update_weights_from_distributed(..., load_format="flattened_bucket")`
into a buffer it rebuilds from names/dtypes/shapes listed in buffer order — hence buckets are
tightly packed, wider dtypes first (`rollout.buckets`).

FP8 rollout weights (`rollout.fp8_weights`, `fp8_weights=True`). The engine is built with FP8
block-quantised projection layers when its config.json says so (`Fp8Config`: float8 `weight` plus
fp32 `weight_scale_inv` per block); pushes must then carry exactly those tensors, which the
resharding stream produces when `fp8_format` is set (`rollout.fp8`). Started without a checkpoint,
the engine gets a config.json that declares 128x128 blocks; from a checkpoint, its
quantization_config must be block-wise FP8 (`fp8.fp8_quant_config` says why other formats cannot
be pushed). Every rank of the group derives the same `fp8_format`, since each runs the stream.
Llama is refused: 0.5.23's `LlamaForCausalLM.load_weights` renames `.weight_scale_inv` to
`.weight_scale`, which block-FP8 layers do not have, so the scales would be dropped (sglang PR
#30234; the contract test notices when that changes).

Images (a vision-language policy, `model.vision`). Each request of a prompt with images carries
them as one `image_data` item `{"format": "processor_output", "pixel_values", "image_grid_thw"}`:
the pixel patches and grids our image processor made (`data.images`), which the learner also
reads. With that form and `input_ids`, 0.5.23 keeps our tokens verbatim (`load_mm_data`'s fast
path for preprocessed items; the runs of image tokens give each image's offsets) and runs no image
processor of its own. Raw images (bytes, PIL) would instead be decoded, resized by the engine's
processor with its own pixel bounds and re-tokenised (decode → text → tokens, which can drift), so
the engine's prompt could differ from the one the learner scores. Hence `input_ids` hold the
expanded image tokens, one per vision-tower output embedding (t·h·w / merge²), as our prompts do.
SGLang then places the image positions (M-RoPE) as our `models.mrope` does: Qwen3-VL's from those
offsets and grids (`_compute_image_only_mrope_positions_from_offsets`), Qwen2.5-VL's with
`get_rope_index`, which finds an image only where `<|vision_start|>` precedes its tokens (the chat
template always writes it; `image_requests` refuses a prompt without it). 0.5.23 takes exactly one
processor-output item per request, so a prompt's images go as one item (its grids split it). Each
of a prompt's n requests (one per sample, for the seeds) carries the same patch tensors, which the
engine pickles to its scheduler and hashes once per request: a cost to measure on GPU (a 1024-token
image is 4096 fp32 patches of 1536 values, 25 MB).
The engine builds its multimodal processor even then (`TokenizerManager.init_tokenizer_and_processor`),
from `tokenizer_path`: a VL engine needs the model's processor files (`processor_path`).
A response never holds an image or video token (the learner would find an image token without an
image): those get a logit bias of -inf. SGLang applies it before it computes log-probs, so its
log-probs are of the distribution without them, log(1 - p(image or video token)) above the
learner's (the embedded engine reports the unrenormalised ones); for a trained model p is ~0.

Weight names: what SGLang's `load_weights` takes are the names of checkpoint files, which for
Qwen2.5-VL keep transformers-4's prefixes (`model.layers.`, `visual.`; given transformers-5's
`model.language_model.` names its loader fails on the fused projections and silently skips the
rest); pushes are renamed with `vision_config.saved_hf_name` (Qwen3-VL's loader takes either).

Routed experts (`return_routed_experts=True`, routing replay): the engine runs with
`enable_return_routed_experts` and each request of a training draw (`SamplingParams.
return_routed_experts`; validation and evaluation do not ask) asks for
`return_routed_experts`; SGLang then returns `meta_info["routed_experts"]`, the base64 of an int32
[prompt + output - 1, layers, top-k] array (`RoutedExpertsCapturer`: every token it ran, from
`routed_experts_start_len=0`), which `parse_generations` turns into `Generation.routed_experts`.

Log-probs: SGLang returns log_softmax(z / T) of the sampled token before top-k/top-p (greedy:
T = 1), the convention of `rollout.engine`.

Seeds: 0.5.23 reads a request's `sampling_seed` only when the engine runs with
`enable_deterministic_inference=True` (`SamplingBatchInfo.from_schedule_batch`; that mode also
switches to the pytorch sampler and batch-invariant kernels). Otherwise the seed is ignored and
sampling follows the scheduler's global RNG: `generate` warns once.

Shutdown: `Engine.shutdown` SIGKILLs every descendant of the calling process
(`kill_process_tree(os.getpid(), include_parent=False)`), not only the engine's: close other
child-process pools first.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import socket
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from rlsd_megatron.config import ConfigError, ModelConfig
from rlsd_megatron.models.hf_mapping import MappingError, expected_hf_shapes
from rlsd_megatron.models.vision_config import saved_hf_name
from rlsd_megatron.parallel.cpu_binding import helper_process_cpus
from rlsd_megatron.parallel.signals import stop_signals_blocked
from rlsd_megatron.rollout.engine import (EngineHealth, Generation, RolloutEngine, SamplingParams, compact_expert_ids,
                                          sample_seed)
from rlsd_megatron.rollout.fp8 import Fp8BlockConfig, fp8_block_quantization_config, fp8_quant_config

SGLANG_VERSION = "0.5.23"
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def import_sglang():
    """The `sglang` module, or an ImportError that says how to get it."""
    try:
        import sglang
        from sglang.srt.entrypoints.engine import Engine  # noqa: F401  (fails early if the runtime is broken)
    except ImportError as exc:
        raise ImportError(
            f"the SGLang rollout backend needs the GPU extra: pip install -e .[gpu] (sglang=={SGLANG_VERSION}); "
            f"without a GPU use rollout.backend=embedded ({exc})"
        ) from exc
    if sglang.__version__ != SGLANG_VERSION:
        warnings.warn(f"sglang {sglang.__version__} is installed; rlsd_megatron is tested against {SGLANG_VERSION}")
    return sglang


# -- pure translation (tested on CPU) ----------------------------------------------------------
def sampling_requests(prompts: Sequence[Sequence[int]], sampling: SamplingParams, prompt_offset: int = 0,
                      banned_token_ids: Sequence[int] = ()) -> tuple[list[list[int]], list[dict]]:
    """One SGLang request per sample, prompt-major: (input_ids, sampling_params dicts).
    `banned_token_ids` are never sampled (a logit bias of -inf, see the module docstring)."""
    input_ids, params = [], []
    for i, prompt in enumerate(prompts):
        for j in range(sampling.n):
            request = {
                "max_new_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k if sampling.top_k > 0 else -1,
                "presence_penalty": sampling.presence_penalty,
                "stop_token_ids": list(sampling.stop_token_ids) or None,
                "skip_special_tokens": False,
                "no_stop_trim": True,
            }
            if sampling.seed is not None:
                request["sampling_seed"] = sample_seed(sampling.seed, prompt_offset + i, j)
            if banned_token_ids:
                request["logit_bias"] = {str(int(t)): float("-inf") for t in banned_token_ids}
            input_ids.append([int(t) for t in prompt])
            params.append(request)
    return input_ids, params


def image_requests(prompts: Sequence[Sequence[int]], images: Sequence[Any] | None, n: int, model: ModelConfig,
                   vision_start_token_id: int | None = None) -> list[list[dict]] | None:
    """SGLang `image_data` for `sampling_requests`' requests (prompt-major, `n` per prompt): one
    processor-output item per prompt with images (`ImageInputs`), [] for a text prompt; None when
    no prompt has images. Raises ValueError when a prompt's image tokens do not match its images
    (one run of t·h·w / merge² image tokens per image; for Qwen2.5-VL each run right after
    `vision_start_token_id`, see the module docstring)."""
    from rlsd_megatron.data.images import image_token_counts

    if images is None or all(x is None for x in images):
        return None
    if model.vision is None:
        raise ValueError("prompts with images given to the SGLang engine of a text-only model (model.vision unset)")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts; give None for text-only ones")
    vision = model.vision
    data = []
    for i, (prompt, x) in enumerate(zip(prompts, images)):
        tokens = [int(t) for t in prompt]
        runs = _runs(tokens, vision.image_token_id)
        counts = image_token_counts(x.image_grid_thw, vision.spatial_merge_size) if x is not None else []
        if [length for _, length in runs] != counts:
            raise ValueError(f"prompt {i} holds image-token runs of {[length for _, length in runs]} tokens for images "
                             f"of {counts} tokens (t*h*w / merge^2 each): build prompts with the model's processor")
        if vision.model_type == "qwen2_5_vl" and any(start == 0 or tokens[start - 1] != vision_start_token_id
                                                     for start, _ in runs):
            raise ValueError(f"prompt {i} has an image without <|vision_start|> (id {vision_start_token_id}) right "
                             "before its tokens: SGLang's Qwen2.5-VL would place it at text positions; render "
                             "prompts with the model's chat template")
        for _ in range(n):  # a list and dict of its own per request (SGLang normalises them in place)
            data.append([] if x is None else [{"format": "processor_output", "pixel_values": x.pixel_values,
                                               "image_grid_thw": x.image_grid_thw}])
    return data


def _runs(tokens: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token` in `tokens`."""
    runs = []
    for i, t in enumerate(tokens):
        if t != token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def parse_generations(outputs: list[dict], n: int, version: int | None, prompt_offset: int = 0,
                      routed_experts: ModelConfig | None = None) -> list[Generation]:
    """SGLang `generate` outputs (one per request, prompt-major) → `Generation`s; with
    `routed_experts` (the engine's MoE model) each one's routed experts as well."""
    generations = []
    for index, out in enumerate(outputs):
        meta = out["meta_info"]
        token_ids = [int(t) for t in out["output_ids"]]
        logprob_entries = meta["output_token_logprobs"]
        if [int(e[1]) for e in logprob_entries] != token_ids:
            raise RuntimeError(f"SGLang returned log-probs for other tokens than it generated (request {index})")
        reason = meta["finish_reason"]
        kind = reason.get("type") if isinstance(reason, dict) else reason
        generations.append(Generation(prompt_offset + index // n, index % n, token_ids,
                                      [float(e[0]) for e in logprob_entries], _FINISH.get(kind, "abort"), version,
                                      _routed_experts(meta, routed_experts, index) if routed_experts else None))
    return generations


def _routed_experts(meta: dict, model: ModelConfig, index: int) -> torch.Tensor:
    """`meta_info["routed_experts"]` (base64 of int32 [tokens, layers, top-k]) as a tensor."""
    import base64

    import numpy as np

    if meta.get("routed_experts") is None:
        raise RuntimeError(f"SGLang returned no routed experts for request {index}: the engine needs "
                           "enable_return_routed_experts=True (rollout.routing_replay sets it)")
    ids = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32)
    return compact_expert_ids(torch.from_numpy(ids.copy()).reshape(-1, model.num_layers, model.moe_router_topk),
                              model.num_experts)


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
    refusing Llama (see the module docstring)."""
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


def flattened_payload(bucket, rename: Callable[[str], str] = str) -> dict:
    """A `FlatBucket` as SGLang's flattened-bucket request payload (no data copied), each tensor
    named `rename(name)` (the engine's name for it)."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    metadata = [
        FlattenedTensorMetadata(name=rename(s.name), shape=torch.Size(s.shape), dtype=s.dtype, start_idx=s.start,
                                end_idx=s.end, numel=s.end - s.start)
        for s in bucket.packed_slots()
    ]
    return {"flattened_tensor": bucket.buffer, "metadata": metadata}


def bucket_spec(bucket, rename: Callable[[str], str] = str) -> tuple[list[str], list[str], list[list[int]]]:
    """(names, dtypes, shapes) in buffer order: what the engine rebuilds an NCCL-received bucket from."""
    slots = bucket.packed_slots()
    return ([rename(s.name) for s in slots], [str(s.dtype).removeprefix("torch.") for s in slots],
            [list(s.shape) for s in slots])


def processor_dir(model: ModelConfig, processor_path: str | None, model_path: str | None) -> str | None:
    """The directory SGLang builds a VL engine's multimodal processor from (`tokenizer_path`):
    `processor_path`, else the model directory; None for a text model. Raises ConfigError when
    it holds neither a `preprocessor_config.json` (released models) nor the `processor_config.json`
    transformers 5 saves (see the module docstring)."""
    if model.vision is None:
        return None
    for candidate in (processor_path, model_path):
        if candidate is None:
            continue
        folder = Path(candidate) if Path(candidate).is_dir() else Path(candidate).parent
        if any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
            return str(folder)
    raise ConfigError(
        f"a vision-language policy on the SGLang backend needs the model's processor files (preprocessor_config.json "
        f"and the tokenizer): sglang {SGLANG_VERSION} builds its multimodal processor even for preprocessed images; "
        f"none in data.tokenizer_dir={processor_path!r} or model.hf_config={model_path!r}. Point data.tokenizer_dir at "
        "the model's directory"
    )


# -- the engine --------------------------------------------------------------------------------
class SGLangEngine(RolloutEngine):
    """One SGLang engine shared by the ranks of `group` (see the module docstring).

    Construct it on every rank of `group` (a gloo group of the learner ranks on the engine's
    GPUs, in GPU order: group rank i feeds engine TP rank i; host = its first rank). With
    group=None this process feeds every engine TP rank from its own GPU (CUDA IPC across devices). `model_path`: an HF model directory
    whose config.json must match `model`; None writes one and starts from dummy weights.
    `server_args` adds or overrides `sglang.Engine` keyword arguments. `pause_mode` is SGLang's
    pause mode around a sync: "abort" (default; the colocated loop has nothing in flight then)
    or "retract" for partial rollouts (requests resume on the new weights; SGLang refuses the
    cache flush while they wait, which is logged). `fp8_weights`: pushes are FP8 block-quantised
    (see the module docstring); raises ConfigError where the engine's config disagrees.
    `processor_path`: a VL model's processor directory (`processor_dir`; default the model's).
    `return_routed_experts`: every generation carries the experts each token went to (routing replay).
    """

    backend = "sglang"

    def __init__(self, model: ModelConfig, *, model_path: str | None = None, engine_tp: int = 1,
                 mem_fraction_static: float = 0.5, base_gpu_id: int = 0, group=None, dtype: str = "bfloat16",
                 transport: str = "ipc", pause_mode: str = "abort", seed: int | None = None,
                 fp8_weights: bool = False, processor_path: str | None = None, return_routed_experts: bool = False,
                 server_args: dict[str, Any] | None = None):
        if transport not in ("ipc", "nccl"):
            raise ValueError(f"transport must be 'ipc' (colocated) or 'nccl' (separate GPUs), got {transport!r}")
        self.model_config = model
        self.engine_tp = engine_tp
        self.group = group
        self.transport = transport
        self.pause_mode = pause_mode
        self.return_routed_experts = return_routed_experts
        self.weight_version: int | None = None
        self.released: set[str] = set()  # memory handed to the learner: weights / kv_cache / cuda_graph
        self.is_host = group is None or dist.get_rank(group) == 0
        if group is not None and transport == "ipc" and dist.get_world_size(group) != engine_tp:
            raise ValueError(f"group has {dist.get_world_size(group)} ranks but the engine {engine_tp} TP ranks: "
                             "update_weights_from_tensor needs exactly one payload per engine TP rank")
        self._nccl_group = None
        self._seed_warned = False
        self._model_dir: str | None = None
        self.server_args: dict[str, Any] = {}
        self.engine = None
        if model_path is None:
            from rlsd_megatron.models.hf_config import hf_config_from_model

            declared = {"quantization_config": fp8_block_quantization_config()} if fp8_weights else {}
            hf_config = hf_config_from_model(model, torch_dtype=dtype, **declared)
        else:
            hf_config = engine_hf_config(model_path)
        self.fp8_format = engine_fp8_format(hf_config, fp8_weights)
        self._engine_name = functools.partial(saved_hf_name, model)
        self.vision_start_token_id = vision_start_token_id(hf_config) if model.vision is not None else None
        # An image or video token sampled in a response has no image behind it in the learner's forward.
        self.banned_token_ids = [t for t in (model.vision.image_token_id, model.vision.video_token_id)
                                 if t is not None] if model.vision is not None else []
        tokenizer_path = processor_dir(model, processor_path, model_path)  # on every rank: all raise alike
        if not self.is_host:
            return
        import_sglang()
        from sglang.srt.entrypoints.engine import Engine

        if model_path is None:
            model_path, load_format = write_hf_config_dir(hf_config), "dummy"
            self._model_dir = model_path
        else:
            check_hf_config(model_path, model)
            load_format = "auto"
        self.server_args = dict(
            model_path=model_path, tp_size=engine_tp, base_gpu_id=base_gpu_id,
            mem_fraction_static=mem_fraction_static, enable_memory_saver=True, load_format=load_format,
            skip_tokenizer_init=True, dtype=dtype, random_seed=seed if seed is not None else 1234,
            log_level="error", nccl_port=free_port_below_ephemeral(),
            enable_return_routed_experts=return_routed_experts,
        )
        if tokenizer_path is not None:
            self.server_args["tokenizer_path"] = tokenizer_path
        self.server_args.update(server_args or {})
        # Its scheduler / detokenizer processes must outlive a SLURM stop signal; they run on the node's
        # CPUs (the learner is idle while they work) with a learner rank's thread count each.
        with stop_signals_blocked(), helper_process_cpus(omp_threads=None):
            self.engine = Engine(**self.server_args)

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 prompt_offset: int = 0, images: Sequence | None = None) -> list[Generation]:
        if not self.is_host:
            raise RuntimeError("generate() runs on the engine's host rank (the first rank of its group)")
        if self.asleep:
            raise RuntimeError("the SGLang engine is asleep; call wake() before generate()")
        if sampling.seed is not None and not self.server_args.get("enable_deterministic_inference") \
                and not self._seed_warned:
            self._seed_warned = True
            warnings.warn(f"sglang {SGLANG_VERSION} ignores per-request sampling_seed unless the engine runs with "
                          "enable_deterministic_inference=True (rollout.deterministic=true): samples are not "
                          "reproducible and depend on batching")
        if sampling.return_routed_experts and not self.return_routed_experts:
            raise ValueError("sampling asks for routed experts from an engine started without them "
                             "(return_routed_experts=False: rollout.routing_replay is off)")
        input_ids, params = sampling_requests(prompts, sampling, prompt_offset, self.banned_token_ids)
        image_data = image_requests(prompts, images, sampling.n, self.model_config, self.vision_start_token_id)
        outputs = self.engine.generate(input_ids=input_ids, sampling_params=params, return_logprob=True,
                                       image_data=image_data, return_routed_experts=sampling.return_routed_experts)
        return parse_generations(outputs, sampling.n, self.weight_version, prompt_offset,
                                 self.model_config if sampling.return_routed_experts else None)

    # -- weights ---------------------------------------------------------------------------
    def update_weights(self, buckets: Iterable, version: int) -> None:
        """Collective over `group`: push every bucket, then finalise (see the module docstring)."""
        failure = None
        session = False
        try:
            if self.is_host:
                self._pause()
                ok, message = self._result(self.engine.begin_weight_update())
                session = ok
                failure = None if ok else f"begin_weight_update: {message}"
            if self.group is not None:  # every rank must stop pushing when the session did not open
                status = [failure]
                dist.broadcast_object_list(status, src=dist.get_global_rank(self.group, 0), group=self.group)
                failure = status[0]
            for bucket in buckets:
                if failure is None:
                    failure = self._push(bucket)
                del bucket  # acknowledged (or failed): safe to free, see the module docstring
        finally:
            if self.is_host:
                try:
                    if session:
                        self._check(self.engine.end_weight_update(), "end_weight_update")
                        flushed = self.engine.flush_cache()
                        if not getattr(flushed, "success", True):
                            warnings.warn(f"SGLang kept its prefix cache after the weight update: {flushed}")
                finally:
                    self._continue()  # never leave the engine paused: generate() would wait forever
            if torch.cuda.is_available():
                torch.cuda.ipc_collect()
        if failure:
            raise RuntimeError(f"SGLang rejected weight version {version}: {failure}")
        self.weight_version = version

    def _push(self, bucket) -> str | None:
        """Send one bucket; returns None on success or the engine's message, on every rank."""
        if self.transport == "nccl":
            return self._push_nccl(bucket) if self.is_host else None
        from sglang.srt.utils.common import MultiprocessingSerializer

        # Not sglang's monkey_patch_torch_reductions (GPU by UUID): its reducer indexes args[6] of
        # every tensor, so ForkingPickler would then fail on CPU tensors in this process. Plain
        # device indices are right here: the engine's processes inherit our CUDA_VISIBLE_DEVICES.
        if bucket.buffer.is_cuda:
            torch.cuda.current_stream(bucket.buffer.device).synchronize()
        payload = MultiprocessingSerializer.serialize(flattened_payload(bucket, self._engine_name))
        if self.group is None:
            payloads = [payload] + [MultiprocessingSerializer.serialize(flattened_payload(bucket, self._engine_name))
                                    for _ in range(self.engine_tp - 1)]
        else:
            gathered = [None] * dist.get_world_size(self.group) if self.is_host else None
            dist.gather_object(payload, gathered, dst=dist.get_global_rank(self.group, 0), group=self.group)
            payloads = gathered
        status = [None]
        if self.is_host:
            ok, message = self.engine.update_weights_from_tensor(payloads, load_format="flattened_bucket",
                                                                 flush_cache=False)
            status = [None if ok else str(message)]
        if self.group is not None:
            dist.broadcast_object_list(status, src=dist.get_global_rank(self.group, 0), group=self.group)
        return status[0]

    def connect_nccl(self, master_address: str, master_port: int, group_name: str = "rlsd_weight_sync") -> None:
        """Non-colocated layout: join an NCCL group with the engine's ranks (host rank only)."""
        from sglang.srt.utils.common import init_custom_process_group

        world = 1 + self.engine_tp
        joined: dict = {}
        engine_side = threading.Thread(target=lambda: joined.update(result=self.engine.init_weights_update_group(
            master_address, master_port, 1, world, group_name, backend="nccl")))
        engine_side.start()
        self._nccl_group = init_custom_process_group(backend="nccl", init_method=f"tcp://{master_address}:{master_port}",
                                                     world_size=world, rank=0, group_name=group_name)
        engine_side.join()
        self._check(joined["result"], "init_weights_update_group")
        self._nccl_group_name = group_name

    def _push_nccl(self, bucket) -> str | None:
        if self._nccl_group is None:
            raise RuntimeError("transport='nccl' needs connect_nccl(master_address, master_port) first")
        result: dict = {}
        names, dtypes, shapes = bucket_spec(bucket, self._engine_name)
        receiver = threading.Thread(target=lambda: result.update(r=self.engine.update_weights_from_distributed(
            names=names, dtypes=dtypes, shapes=shapes, group_name=self._nccl_group_name, flush_cache=False,
            load_format="flattened_bucket")))
        receiver.start()
        dist.broadcast(bucket.buffer, group=self._nccl_group, group_src=0)
        receiver.join()
        ok, message = result["r"]
        return None if ok else str(message)

    def _pause(self) -> None:
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        manager = self.engine.tokenizer_manager
        self.engine.loop.run_until_complete(manager.pause_generation(PauseGenerationReqInput(mode=self.pause_mode)))

    def _continue(self) -> None:
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput

        manager = self.engine.tokenizer_manager
        self.engine.loop.run_until_complete(manager.continue_generation(ContinueGenerationReqInput()))

    @staticmethod
    def _result(result) -> tuple[bool, Any]:
        return result if isinstance(result, tuple) else (getattr(result, "success", True), result)

    @classmethod
    def _check(cls, result, what: str) -> None:
        ok, message = cls._result(result)
        if not ok:
            raise RuntimeError(f"SGLang {what} failed: {message}")

    # -- memory and lifecycle --------------------------------------------------------------
    @property
    def asleep(self) -> bool:
        return bool(self.released & {"weights", "kv_cache"})

    def sleep(self) -> None:
        """Release weights, KV cache and CUDA graphs (the engine must be idle). Only what is still
        held: SGLang's resume raises on a tag it did not release (`offload_tags.remove`)."""
        todo = {"weights", "kv_cache", "cuda_graph"} - self.released
        if self.is_host and todo:
            self.engine.release_memory_occupation(sorted(todo))
        self.released |= todo

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Re-take memory: `["weights"]` before a sync, then `["kv_cache", "cuda_graph"]` after it
        keeps the peak lower; None takes everything released."""
        wanted = self.released if tags is None else self.released & set(tags)
        if self.is_host and wanted:
            self.engine.resume_memory_occupation(sorted(wanted))
        self.released -= wanted

    def flush_cache(self) -> None:
        if self.is_host:
            self.engine.flush_cache()

    def health(self) -> EngineHealth:
        if not self.is_host:
            return EngineHealth(self.backend, ok=True, weight_version=self.weight_version, asleep=self.asleep,
                                detail={"host": False})
        try:
            info = self.engine.get_server_info()
            ok = True
        except Exception as exc:  # a dead scheduler shows up here
            info, ok = {"error": repr(exc)}, False
        return EngineHealth(self.backend, ok=ok, weight_version=self.weight_version, asleep=self.asleep,
                            detail={"host": True, "engine_tp": self.engine_tp,
                                    "server_weight_version": info.get("weight_version")})

    def shutdown(self) -> None:
        """Stop the engine. SGLang kills every child process of this process (module docstring)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self._model_dir is not None:
            shutil.rmtree(self._model_dir, ignore_errors=True)
            self._model_dir = None
