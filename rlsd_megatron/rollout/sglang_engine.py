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

Weight names: what SGLang's `load_weights` takes are the names of checkpoint files, which for
Qwen2.5-VL keep transformers-4's prefixes (`model.layers.`, `visual.`; given transformers-5's
`model.language_model.` names its loader fails on the fused projections and silently skips the
rest); pushes are renamed with `vision_config.saved_hf_name` (Qwen3-VL's loader takes either).

Shutdown: `Engine.shutdown` SIGKILLs every descendant of the calling process
(`kill_process_tree(os.getpid(), include_parent=False)`), not only the engine's: close other
child-process pools first.
"""

from __future__ import annotations

import functools
import shutil
import threading
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from rlsd_megatron.config import ModelConfig
from rlsd_megatron.models.vision_config import saved_hf_name
from rlsd_megatron.parallel.cpu_binding import helper_process_cpus
from rlsd_megatron.parallel.signals import stop_signals_blocked
from rlsd_megatron.rollout.engine import EngineHealth, Generation, RolloutEngine, SamplingParams
from rlsd_megatron.rollout.fp8 import fp8_block_quantization_config
from rlsd_megatron.rollout.sglang_launch import (SGLANG_VERSION, check_hf_config, engine_fp8_format, engine_hf_config,
                                                 free_port_below_ephemeral, processor_dir, vision_start_token_id,
                                                 write_hf_config_dir)
from rlsd_megatron.rollout.sglang_requests import image_requests, parse_generations, sampling_requests


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
