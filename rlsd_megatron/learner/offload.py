"""The learner off the GPU while the engine generates (`train.offload`).

Colocated, the engine and the learner take turns on the same GPUs; the engine already releases
its memory while the learner trains. `LearnerOffload` does the reverse: after the weight sync
it moves the learner's weights, gradient buffers and optimizer state (fp32 main weights, Adam
moments) off the device, and before the step's scoring brings them back, bit for bit. Two ways:

- `copy`: every device storage those tensors live in (Megatron's DDP buffers hold all weights
  and all gradients of a chunk in one storage each; parameters and main grads are views into
  them) is copied into a host buffer (pinned on CUDA, so the copies are DMA) and then resized to
  0 bytes, which frees it while every view, parameter and optimizer reference stays valid; onload
  resizes it back and copies the bytes in. Gradient buffers are not copied: the next update
  zeroes them before use, so they come back as zeros. The same code runs on CPU (host buffer →
  host buffer), where the resize really frees the learner's tensors, so the CPU tests exercise
  the GPU path. The device addresses change on onload; nothing of ours caches them (no CUDA
  graphs over the learner).
- `torch_memory_saver` (GPU): the learner is allocated inside a torch_memory_saver region
  (`allocation_region`, with CPU backup), and offload / onload are its `pause` / `resume` of that
  tag, which keep the virtual addresses. It releases whatever the region allocated, including
  the optimizer state, which `allocation_region` creates eagerly for that reason.
"""

from __future__ import annotations

import contextlib
import time

import torch

TAG = "learner"  # the torch_memory_saver region of the learner's allocations


def _memory_saver():
    """The torch_memory_saver singleton in its in-process allocator mode (no LD_PRELOAD needed)."""
    if not torch.cuda.is_available():
        raise RuntimeError("train.offload=torch_memory_saver needs a CUDA GPU (none is visible); use "
                           "train.offload=copy, which works on any device")
    try:
        from torch_memory_saver import torch_memory_saver
    except ImportError as exc:
        raise RuntimeError(f"train.offload=torch_memory_saver needs the torch_memory_saver package ({exc}); it comes "
                           "with the [gpu] extra (sglang depends on it): pip install -e '.[gpu]', or use "
                           "train.offload=copy") from None
    return torch_memory_saver


@contextlib.contextmanager
def allocation_region(mode: str):
    """Context in which the learner is built when `mode` is torch_memory_saver (a no-op
    otherwise): its allocations land in the region that `pause` / `resume` release and restore."""
    if mode != "torch_memory_saver":
        yield
        return
    saver = _memory_saver()
    try:
        saver.hook_mode = "torch"  # settable only before the singleton's first use
    except (AssertionError, AttributeError):  # its setter's check once the singleton is initialised
        pass  # a second learner in this process: the mode was set by the first
    with saver.region(tag=TAG, enable_cpu_backup=True):
        yield


def create_optimizer_state(learner) -> None:
    """Every optimizer state tensor now (Adam moments are otherwise created on the first step,
    outside the allocation region): megatron-core's own `init_state_fn`, then the per-parameter
    step of torch's Adam (`Learner.init_optimizer_state`)."""
    for wrapper in getattr(learner.optimizer, "chained_optimizers", [learner.optimizer]):
        if getattr(wrapper, "init_state_fn", None) is not None:
            wrapper.init_state_fn(wrapper.optimizer, wrapper.config)
    learner.init_optimizer_state()


class LearnerOffload:
    """Moves one `Learner`'s weights, gradients and optimizer state off its device and back.

    `offload()` and `onload()` are idempotent; `resident` says where the state is;
    `last_seconds` holds the duration of the last offload and onload (perf metrics)."""

    def __init__(self, learner, mode: str):
        if mode not in ("copy", "torch_memory_saver"):
            raise ValueError(f"train.offload={mode!r}: use none, copy or torch_memory_saver")
        self.learner = learner
        self.mode = mode
        self.resident = True
        self.last_seconds: dict[str, float] = {}
        self._host: dict[int, torch.Tensor] = {}  # storage key -> host copy of its bytes
        self._storages: dict[int, tuple[torch.UntypedStorage, int, bool]] | None = None

    def _device_storages(self) -> dict[int, tuple[torch.UntypedStorage, int, bool]]:
        """Each distinct storage of the learner's state: key -> (storage, bytes, keep its content).
        Gradients (`main_grad`, `.grad`) are not kept unless a weight or optimizer tensor shares
        their storage."""
        device = self.learner.device
        found: dict[int, tuple[torch.UntypedStorage, int, bool]] = {}

        def add(tensor, keep: bool):
            if not isinstance(tensor, torch.Tensor) or tensor.device != device:
                return
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0:
                return
            key = storage._cdata  # the storage object itself: stable across resizes, unlike data_ptr()
            old = found.get(key)
            found[key] = (storage, storage.nbytes(), keep or (old is not None and old[2]))

        for _, param in self.learner.named_parameters():
            add(param, True)
            add(getattr(param, "main_grad", None), False)
            add(param.grad, False)
        for wrapper in getattr(self.learner.optimizer, "chained_optimizers", [self.learner.optimizer]):
            inner = wrapper.optimizer
            for group in inner.param_groups:
                for param in group["params"]:
                    add(param, True)  # fp32 main weights (their own storage under bf16)
                    add(param.grad, False)
                    for value in inner.state.get(param, {}).values():
                        add(value, True)
        return found

    def offload(self) -> None:
        """Weights, gradients and optimizer state off the device (no-op when already off)."""
        if not self.resident:
            return
        started = time.perf_counter()
        if self.mode == "torch_memory_saver":
            torch.cuda.synchronize()
            _memory_saver().pause(tag=TAG)
        else:
            self._storages = self._device_storages()
            pin = torch.cuda.is_available() and self.learner.device.type == "cuda"
            for key, (storage, nbytes, keep) in self._storages.items():
                if keep:
                    host = self._host.get(key)
                    if host is None or host.numel() != nbytes:
                        host = self._host[key] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
                    host.copy_(_bytes_of(storage), non_blocking=pin)
            if pin:
                torch.cuda.synchronize()  # the copies have landed before the device memory goes
            for storage, _, _ in self._storages.values():
                storage.resize_(0)
            if pin:  # the caching allocator would keep the freed blocks from the engine's processes
                torch.cuda.empty_cache()
        self.resident = False
        self.last_seconds["offload"] = time.perf_counter() - started

    def onload(self) -> None:
        """Everything `offload` moved back on the device, as it was (gradients as zeros)."""
        if self.resident:
            return
        started = time.perf_counter()
        if self.mode == "torch_memory_saver":
            _memory_saver().resume(tag=TAG)
        else:
            host = self._host  # kept for the next offload: the host memory is the learner's home meanwhile
            pin = self.learner.device.type == "cuda"
            for key, (storage, nbytes, keep) in self._storages.items():
                storage.resize_(nbytes)
                target = _bytes_of(storage)
                if keep:
                    target.copy_(host[key], non_blocking=pin)
                else:
                    target.zero_()
            if pin:
                torch.cuda.synchronize()
            self._storages = None
        self.resident = True
        self.last_seconds["onload"] = time.perf_counter() - started

    def metrics(self) -> dict[str, float]:
        """`perf/offload_seconds` and `perf/onload_seconds` of the last of each."""
        return {f"perf/{name}_seconds": seconds for name, seconds in self.last_seconds.items()}


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over all of `storage` (its device, its bytes)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))
