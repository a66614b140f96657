"""Size-bounded buckets of full HF tensors: the unit of every weight push to a rollout engine.

A `FlatBucket` packs tensors back to back, with no gaps, in one uint8 buffer — the layout of
SGLang's `FlattenedTensorBucket`, which the engine also rebuilds on its own from names / dtypes /
shapes listed in buffer order when it receives a bucket by NCCL broadcast. Tensors of several
dtypes share a bucket (FP8 weights with their fp32 scales and bf16 norms): wider dtypes come first
in the buffer, so every tensor starts at a multiple of its element size without padding, which
both torch's dtype views and SGLang's receiving side require. `plan_buckets` fixes every bucket's
contents from the shapes before any data moves: at most `bucket_bytes` each, except a single tensor
larger than the bound, which gets a bucket of its own.

Lifetime: each bucket is a fresh buffer, filled once, handed to the consumer, and never written
again; the consumer drops it (`del bucket`) once the engine has acknowledged it, before asking for
the next, so at most one bucket is alive. On CPU a dropped bucket's buffer is recycled for the
next bucket of the same stream, but only if no tensor still views it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from rlsd_megatron.memory import CpuBufferCache
from rlsd_megatron.models.hf_mapping import MappingError

DEFAULT_BUCKET_BYTES = 512 * 2**20


@dataclass(frozen=True)
class TensorSlot:
    """Where one HF tensor lives in a bucket's byte buffer: bytes [start, end)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int


class FlatBucket:
    """Full HF tensors packed back to back in one uint8 buffer, wider dtypes first.

    `slots` are in stream order: `put` fills them in that order (one tensor, or its tensor-parallel
    pieces); `packed_slots()` lists them in buffer order. `named_tensors()` gives views into the
    buffer: consumers copy out of them, and a view kept keeps the memory (a kept view is never
    recycled). `FlatBucket.live_bytes` counts the bytes of buckets not yet dropped and
    `FlatBucket.peak_bytes` its high-water mark: how the tests hold the one-bucket memory bound to
    account.
    """

    live_bytes = 0
    peak_bytes = 0

    def __init__(self, slots: list[TensorSlot], device: torch.device | str, pool: CpuBufferCache | None = None):
        self.slots = slots
        self.nbytes = packed_bytes(slots)
        self.buffer = (pool.take(self.nbytes, torch.uint8) if pool is not None
                       else torch.empty(self.nbytes, dtype=torch.uint8, device=device))
        self._next = 0  # index of the next slot to fill
        FlatBucket.live_bytes += self.nbytes
        FlatBucket.peak_bytes = max(FlatBucket.peak_bytes, FlatBucket.live_bytes)
        weakref.finalize(self, FlatBucket._release, self.nbytes)

    @staticmethod
    def _release(nbytes: int) -> None:
        FlatBucket.live_bytes -= nbytes

    @classmethod
    def reset_peak(cls) -> None:
        cls.peak_bytes = cls.live_bytes

    def view(self, slot: TensorSlot) -> torch.Tensor:
        return self.buffer[slot.start:slot.end].view(slot.dtype).view(slot.shape)

    def packed_slots(self) -> list[TensorSlot]:
        """The slots in buffer order: what a receiver rebuilds the bucket from."""
        return sorted(self.slots, key=lambda slot: slot.start)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(HF name, view of the buffer) for every tensor, in stream order."""
        return [(slot.name, self.view(slot)) for slot in self.slots]

    def put(self, name: str, pieces: torch.Tensor | Sequence[torch.Tensor], dim: int = 0, *,
            truncate: bool = False) -> None:
        """Copy the next planned tensor in (`write_pieces`); name and dtype must be the plan's."""
        slot = self.slots[self._next]
        if name != slot.name:
            raise MappingError(f"resharding produced {name!r} where the plan expected {slot.name!r}: "
                               f"the Megatron parameters do not match the model config")
        dtype = pieces.dtype if isinstance(pieces, torch.Tensor) else pieces[0].dtype
        if dtype != slot.dtype:  # copy_ would cast silently (an FP8 slot would lose its scale)
            raise MappingError(f"resharding produced {name!r} as {dtype}, the plan holds {slot.dtype}")
        write_pieces(self.view(slot), name, pieces, dim, truncate=truncate)
        self._next += 1

    @property
    def complete(self) -> bool:
        return self._next == len(self.slots)


def write_pieces(target: torch.Tensor, name: str, pieces: torch.Tensor | Sequence[torch.Tensor], dim: int = 0, *,
                 truncate: bool = False) -> None:
    """Copy `pieces` concatenated along `dim` into `target` (tensor-parallel shards written straight
    to their place, never concatenated first). With `truncate`, rows past `target`'s size along
    `dim` are dropped (vocabulary padding). Raises MappingError naming `name` on a shape mismatch."""
    pieces = [pieces] if isinstance(pieces, torch.Tensor) else list(pieces)
    rows = sum(p.shape[dim] for p in pieces)
    want = tuple(target.shape[:dim]) + tuple(target.shape[dim + 1:])
    fits = rows == target.shape[dim] or (truncate and rows > target.shape[dim])
    if not fits or any(tuple(p.shape[:dim]) + tuple(p.shape[dim + 1:]) != want for p in pieces):
        got = list(pieces[0].shape)
        got[dim] = rows
        raise MappingError(f"resharding produced {name!r} with shape {tuple(got)}, its destination has shape "
                           f"{tuple(target.shape)}: the Megatron parameters do not match the model config")
    offset = 0
    for piece in pieces:
        n = min(piece.shape[dim], target.shape[dim] - offset)
        if n <= 0:
            break
        target.narrow(dim, offset, n).copy_(piece.narrow(dim, 0, n))
        offset += n


def bucket_buffers(largest_bucket: int) -> CpuBufferCache:
    """The buffer cache of one CPU bucket stream. A fresh CPU allocation of bucket size is
    mmap'ed, and its first-touch page faults (the kernel zeroing every page) make filling it 3-5x
    slower than a memcpy (measured here); a dropped bucket's buffer is reused once no tensor views
    it. GPU buckets are not cached: the CUDA caching allocator reuses blocks, and CUDA IPC keeps a
    shared block out of it until the engine has let go of it."""
    return CpuBufferCache(slots=2, min_numel=largest_bucket)


def plan_buckets(tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 bucket_bytes: int) -> list[list[TensorSlot]]:
    """Split (name, shape, dtype) in stream order into buckets of at most `bucket_bytes` (a larger
    tensor alone in its bucket); each bucket's slots in stream order, tightly packed, wider dtypes
    first."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
    used = 0
    for name, shape, dtype in tensors:
        size = torch.Size(shape).numel() * dtype.itemsize
        if not groups or used + size > bucket_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, tuple(shape), dtype))
        used += size
    return [_packed(group) for group in groups]


def _packed(tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> list[TensorSlot]:
    """Slots for `tensors` (kept in their order) laid out by decreasing element size: every size is
    a multiple of the element sizes after it, so each tensor starts aligned."""
    sizes = [torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in tensors]
    starts, offset = [0] * len(tensors), 0
    for i in sorted(range(len(tensors)), key=lambda i: -tensors[i][2].itemsize):  # stable
        starts[i] = offset
        offset += sizes[i]
    return [TensorSlot(name, shape, dtype, start, start + size)
            for (name, shape, dtype), start, size in zip(tensors, starts, sizes)]


def packed_bytes(slots: list[TensorSlot]) -> int:
    """Size of the buffer holding `slots`."""
    return sum(slot.end - slot.start for slot in slots)


def pack_buckets(named_tensors: list[tuple[str, torch.Tensor]], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device: torch.device | str | None = None) -> Iterator[FlatBucket]:
    """Buckets of already-full HF tensors (e.g. a checkpoint's state dict for an engine's first
    load, or tests), planned and released like the resharding stream's."""
    tensors = dict(named_tensors)
    plan = plan_buckets(((n, tuple(t.shape), t.dtype) for n, t in named_tensors), bucket_bytes)
    pool = bucket_buffers(max(map(packed_bytes, plan)) if plan else 0)
    for slots in plan:
        where = torch.device(device if device is not None else tensors[slots[0].name].device)
        bucket = FlatBucket(slots, where, pool if where.type == "cpu" else None)
        for slot in slots:
            bucket.put(slot.name, tensors[slot.name])
        yield bucket
        del bucket
