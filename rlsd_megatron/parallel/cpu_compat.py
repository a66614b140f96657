"""The one place where megatron-core's CUDA assumptions are met on a machine without a GPU.

megatron-core is written for GPUs. Its model, tensor-parallel layers, pipeline schedule and
distributed optimizer run unchanged on CPU over gloo once these assumptions hold:

1. `torch.cuda.current_device()` is called to pick a device (rotary embedding, DDP buffers,
   p2p shapes); streams, events and `synchronize()` order DDP's gradient reduction and the
   pipeline's p2p communication. Without a driver all of these raise. We make
   `current_device()` return 0 and point the stream/event API at `torch.cpu`'s no-op
   equivalents, and a `TorchFunctionMode` maps every CUDA device argument (`device="cuda"`,
   `device=0`, `.cuda()`, `.to("cuda")`) to the CPU, which covers the tensor factories in the
   schedules and buffers generically instead of per call site. The same mode makes
   `tensor.type()` report `torch.cuda.*` names, which the optimizer and grad clipping
   assert on.
2. The RNG-states tracker (`tensor_parallel.random`) stores and swaps CUDA generator states.
   `CpuRNGStatesTracker` keeps the same add/fork/get_states/set_states interface over the CPU
   generator, and the module-level CUDA state getters/setters it and activation
   recomputation use are pointed at the CPU generator.
3. MoE (the all-to-all token dispatcher): its side stream's `record_event` must return an event
   (`CpuStream`); the split sizes it copies to the host must be numpy arrays as they are on GPUs
   (`_host_copy`); under TP x EP it all-gathers pieces of different lengths and reduce-scatters
   them back, which NCCL does and gloo does not (`_all_gather`, `_reduce_scatter`).
4. The autograd engine runs custom Functions' backward (megatron's activation recompute reruns
   whole layers there) without the thread's torch-function modes: their backward gets the mode
   of (1) again.
5. NCCL completes a small send into the peer's buffer before the peer posts its receive; a gloo
   send waits for the receive. The interleaved pipeline schedule relies on the former: a stage
   waits on the tensor-shape sends of one exchange while its peer is still waiting on the data
   of an earlier one (pp=4, vpp=2 deadlocks on gloo). `_batch_isend_irecv` sends a copy and
   reports the send done at once, as NCCL's buffering does; the copy is sent when the peer
   receives it, in the order the sends were posted.

`install()` is a no-op when CUDA is available: GPU runs use megatron-core untouched.
`tests/parallel/test_cpu_compat.py` runs the model, pipeline schedule and optimizer with the
shims in place and fails when a megatron-core upgrade adds a CUDA call on these paths.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode

_installed = False


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare int device index means a CUDA device
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of any torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizer and grad clipping compare type strings with "torch.cuda.*".
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuStream(torch.cpu.Stream):
    """`torch.cpu.Stream` whose `record_event` returns an event: the CPU one returns None, and
    megatron-core's MoE all-to-all dispatcher synchronises on the event its side stream records."""

    def record_event(self, event=None):
        return event or torch.cpu.Event()


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron-core's `moe_utils.maybe_move_tensor_to_cpu` for CPU tensors: the split sizes the MoE
    all-to-all dispatcher copies off the GPU become numpy arrays there, which `all_to_all_single`
    takes; the original leaves CPU tensors as they are, which it refuses."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


_gloo_all_gather = torch.distributed.all_gather


def _all_gather(tensor_list, tensor, group=None, async_op=False):
    """`dist.all_gather` that also takes pieces of different lengths (first dim), which gloo
    refuses: megatron-core's MoE dispatcher gathers each rank's tokens over expert-TP so under
    TP x EP. Uneven pieces are zero-padded to the longest, gathered and cut back."""
    if all(t.shape == tensor.shape for t in tensor_list):
        return _gloo_all_gather(tensor_list, tensor, group=group, async_op=async_op)
    if async_op:
        raise NotImplementedError("asynchronous all_gather of uneven pieces on gloo")
    rows = max(t.shape[0] for t in tensor_list)
    padded = [t.new_empty(rows, *t.shape[1:]) for t in tensor_list]
    mine = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
    _gloo_all_gather(padded, mine, group=group)
    for out, full in zip(tensor_list, padded):
        out.copy_(full[: out.shape[0]])
    return None


def _reduce_scatter(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
    """`dist.reduce_scatter` (a list of pieces, possibly of different lengths), which gloo lacks:
    the backward of the uneven gather above. All-reduces the whole and keeps this rank's piece."""
    if async_op:
        raise NotImplementedError("asynchronous reduce_scatter on gloo")
    whole = torch.cat([piece.reshape(-1) for piece in input_list])
    torch.distributed.all_reduce(whole, op=op, group=group)
    rank = torch.distributed.get_rank(group)
    start = sum(piece.numel() for piece in input_list[:rank])
    output.copy_(whole[start: start + output.numel()].view_as(output))
    return None


class _Sent:
    """The request of a send that is buffered (see `_batch_isend_irecv`): already complete."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


_gloo_batch_isend_irecv = torch.distributed.batch_isend_irecv
# Buffered sends whose receiver has not taken them yet; their requests must outlive the call.
_sends_in_flight: list = []


def _batch_isend_irecv(p2p_op_list):
    """`dist.batch_isend_irecv` with NCCL's buffered sends: each send goes out as a copy (the
    caller may free or reuse its tensor, as megatron's `deallocate_pipeline_outputs` does) and
    its request is complete at once; receives are returned as they are."""
    ops = []
    for op in p2p_op_list:
        if op.op is torch.distributed.isend:
            op = torch.distributed.P2POp(op.op, op.tensor.clone(), op.peer, op.group, op.tag)
        ops.append(op)
    works = _gloo_batch_isend_irecv(ops)
    assert len(works) == len(ops), "gloo returns one request per operation"
    _sends_in_flight[:] = [w for w in _sends_in_flight if not w.is_completed()]
    requests = []
    for op, work in zip(ops, works):
        if op.op is torch.distributed.isend:
            _sends_in_flight.append(work)
            work = _Sent()
        requests.append(work)
    return requests


class CpuRNGStatesTracker:
    """Megatron's RNG-states tracker interface (add / fork / get_states / set_states / reset)
    over the CPU default generator, so tensor-parallel regions get their own seeded streams."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"RNG seed {seed} already exists in the tracker")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name!r} already exists in the tracker")
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} was never added to the tracker")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def install() -> bool:
    """Install the CPU shims when CUDA is absent; returns whether they are active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    # With sglang installed, `import flash_mla` raises OSError (no driver) where megatron's
    # attention module only catches ImportError; a None entry makes it an ImportError.
    sys.modules.setdefault("flash_mla", None)
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import token_dispatcher

    torch.cuda.current_device = lambda: 0
    # Streams and events only order work on a GPU; torch.cpu has no-op stand-ins with the same
    # interface (used by DDP's grad-sync and the p2p/pipeline code).
    torch.cuda.synchronize = torch.cpu.synchronize
    torch.cuda.current_stream = torch.cpu.current_stream
    torch.cuda.default_stream = torch.cpu.current_stream
    torch.cuda.Stream = CpuStream
    torch.cuda.stream = torch.cpu.stream
    torch.cuda.Event = torch.cpu.Event
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    torch.distributed.all_gather = _all_gather
    torch.distributed.reduce_scatter = _reduce_scatter
    torch.distributed.batch_isend_irecv = _batch_isend_irecv

    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    mcore_random.initialize_rng_tracker(force_reset=True)

    CudaToCpuMode().__enter__()  # stays on this thread's mode stack for the process lifetime
    # The autograd engine calls custom Functions' backward with no torch-function mode active,
    # so megatron's activation recompute (CheckpointFunction.backward reruns the layers' forward:
    # the MoE dispatcher allocates on torch.cuda.current_device() there) would reach CUDA.
    BackwardCFunction.apply = _backward_on_cpu(BackwardCFunction.apply)
    _installed = True
    return True


def _backward_on_cpu(apply):
    def backward_apply(self, *args):
        with CudaToCpuMode():
            return apply(self, *args)

    return backward_apply
