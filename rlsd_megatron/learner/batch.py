"""Micro-batches of variable-length sequences for the learner, and their inverse.

Convention: callers give, per sequence, tensors aligned with its tokens along dim 0 (`fields`,
e.g. a loss mask that is 1 on response tokens, old log-probs, advantages, or [L, V/TP] teacher
logits). The learner predicts token
t from the logits at position t-1, so a `MicroBatch` stores everything *shifted*: at position t
it holds `targets[t] = token[t+1]` and `fields[k][t] = field_k[t+1]`. `MicroBatch.to_sequences`
undoes the shift, returning per-token outputs aligned with tokens again (token 0 has no
prediction and gets 0). One field is a model input rather than a loss input and so is not shifted:
`ROUTED_EXPERTS`, the rollout engine's experts of each token (routing replay), which the
micro-batch holds as `routed_experts` at the token's own position, -1 where there are none.

Two layouts:
- padded ([B, S], right padding, causal mask): megatron-core's local layers (CPU).
- packed THD ([1, T] with `PackedSeqParams` cu_seqlens): Transformer Engine layers (GPU); no
  compute on padding.
Context parallelism splits every sequence into 2·CP chunks and gives rank r chunks r and
2·CP-1-r, balancing causal-attention work (Megatron's scheme); `cp_positions` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

# The per-sequence field [L, layers, top-k] of the experts the rollout engine routed each token to
# (-1: none recorded); `MicroBatch.routed_experts` holds it unshifted (learner.routing_replay).
ROUTED_EXPERTS = "routed_experts"


@dataclass
class MicroBatch:
    """One learner micro-batch; all [B, S] tensors are aligned with the logits' positions."""

    tokens: torch.Tensor  # [B, S] input ids
    position_ids: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S] id of the next token (0 where there is none)
    target_mask: torch.Tensor  # [B, S] bool: a real next token exists at this position
    fields: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, S, ...] shifted caller fields
    lengths: list[int] = field(default_factory=list)  # original sequence lengths
    packed_seq_params: Any = None  # PackedSeqParams for THD, None for padded
    # THD only: for each sequence, where its positions start in the packed row.
    offsets: list[int] = field(default_factory=list)
    # Positions of the full (un-split) sequence this rank holds; None without CP.
    cp_index: torch.Tensor | None = None
    # A vision-language batch's images (`models.vision_language.ImageInputs`, learner.vision_batch);
    # its position_ids are then M-RoPE's [3, B, S].
    images: Any = None
    # [B, S, layers, top-k] int16: the engine's experts for the token *at* each position (the
    # router runs on the token, not on its prediction), -1 where none (padding, the last sampled
    # token); None: the routers choose themselves.
    routed_experts: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    def to_sequences(self, per_position: torch.Tensor) -> list[torch.Tensor]:
        """[B, S] (padded) or [1, T] (packed) per-position values → per-sequence [L] tensors
        aligned with tokens: out[t] = value predicted at position t-1, out[0] = 0."""
        if self.cp_index is not None:
            raise ValueError("merge context-parallel shards first (learner.gather_cp)")
        out = []
        for i, length in enumerate(self.lengths):
            row, start = (0, self.offsets[i]) if self.packed_seq_params is not None else (i, 0)
            values = per_position[row, start:start + length - 1]
            out.append(torch.cat([values.new_zeros(1, *values.shape[1:]), values]))
        return out


def _shift(values: torch.Tensor) -> torch.Tensor:
    """x[t] ← x[t+1], last position 0."""
    return torch.cat([values[1:], values.new_zeros(1, *values.shape[1:])])


def _routed_experts(fields: dict[str, list[torch.Tensor]], rows: int, width: int,
                     places: list[tuple[int, int]]) -> torch.Tensor | None:
    """The `ROUTED_EXPERTS` field placed unshifted into [rows, width, layers, k] (-1 elsewhere);
    `places[i]` is (row, start) of sequence i; None without that field."""
    values = fields.get(ROUTED_EXPERTS)
    if values is None:
        return None
    out = torch.full((rows, width, *values[0].shape[1:]), -1, dtype=torch.int16)
    for (row, start), value in zip(places, values):
        out[row, start:start + len(value)] = value
    return out


def _check_sequences(sequences: list[torch.Tensor], fields: dict[str, list[torch.Tensor]]) -> None:
    if not sequences:
        raise ValueError("a micro-batch needs at least one sequence")
    for i, seq in enumerate(sequences):
        if seq.dim() != 1 or seq.numel() < 2:
            raise ValueError(f"sequence {i} must be 1-D with at least 2 tokens, got shape {tuple(seq.shape)}")
    for name, values in fields.items():
        if len(values) != len(sequences):
            raise ValueError(f"field {name!r} has {len(values)} entries for {len(sequences)} sequences")
        for i, (value, seq) in enumerate(zip(values, sequences)):
            if value.dim() < 1 or value.shape[0] != seq.shape[0]:
                raise ValueError(
                    f"field {name!r} of sequence {i} has shape {tuple(value.shape)}, tokens {tuple(seq.shape)}"
                )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_micro_batch(
    sequences: list[torch.Tensor],
    fields: dict[str, list[torch.Tensor]] | None = None,
    *,
    pad_to_multiple: int = 1,
) -> MicroBatch:
    """Right-pad `sequences` into a [B, S] micro-batch (S a multiple of `pad_to_multiple`)."""
    fields = fields or {}
    _check_sequences(sequences, fields)
    lengths = [int(s.numel()) for s in sequences]
    width = _round_up(max(lengths), pad_to_multiple)
    batch = len(sequences)
    tokens = torch.zeros(batch, width, dtype=torch.long)
    targets = torch.zeros(batch, width, dtype=torch.long)
    target_mask = torch.zeros(batch, width, dtype=torch.bool)
    routed = _routed_experts(fields, batch, width, [(i, 0) for i in range(batch)])
    fields = {name: vals for name, vals in fields.items() if name != ROUTED_EXPERTS}
    shifted = {name: vals[0].new_zeros(batch, width, *vals[0].shape[1:]) for name, vals in fields.items()}
    for i, (seq, length) in enumerate(zip(sequences, lengths)):
        tokens[i, :length] = seq
        targets[i, :length] = _shift(seq)
        target_mask[i, : length - 1] = True
        for name, vals in fields.items():
            shifted[name][i, :length] = _shift(vals[i])
    position_ids = torch.arange(width).unsqueeze(0).expand(batch, width).contiguous()
    return MicroBatch(tokens, position_ids, targets, target_mask, shifted, lengths, routed_experts=routed)


def packed_micro_batch(
    sequences: list[torch.Tensor],
    fields: dict[str, list[torch.Tensor]] | None = None,
    *,
    pad_to_multiple: int = 1,
    pad_total_to_multiple: int = 1,
) -> MicroBatch:
    """Pack `sequences` into one [1, T] THD row; each padded to a multiple of `pad_to_multiple`
    (2·CP with context parallelism, as TE requires), the last one further so that T is a
    multiple of `pad_total_to_multiple` as well (sequence parallelism splits T over TP, FP8
    GEMMs want row counts in multiples of 16)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    fields = fields or {}
    _check_sequences(sequences, fields)
    lengths = [int(s.numel()) for s in sequences]
    padded = [_round_up(n, pad_to_multiple) for n in lengths]
    total_multiple = math.lcm(pad_to_multiple, pad_total_to_multiple)  # keeps the last one's multiple
    padded[-1] += _round_up(sum(padded), total_multiple) - sum(padded)
    offsets = [0]
    for n in padded[:-1]:
        offsets.append(offsets[-1] + n)
    total = sum(padded)
    routed = _routed_experts(fields, 1, total, [(0, start) for start in offsets])
    fields = {name: vals for name, vals in fields.items() if name != ROUTED_EXPERTS}
    tokens = torch.zeros(1, total, dtype=torch.long)
    targets = torch.zeros(1, total, dtype=torch.long)
    target_mask = torch.zeros(1, total, dtype=torch.bool)
    position_ids = torch.zeros(1, total, dtype=torch.long)
    shifted = {name: vals[0].new_zeros(1, total, *vals[0].shape[1:]) for name, vals in fields.items()}
    for i, (seq, length, start, width) in enumerate(zip(sequences, lengths, offsets, padded)):
        tokens[0, start:start + length] = seq
        targets[0, start:start + length] = _shift(seq)
        target_mask[0, start:start + length - 1] = True
        position_ids[0, start:start + width] = torch.arange(width)
        for name, vals in fields.items():
            shifted[name][0, start:start + length] = _shift(vals[i])
    cu_real = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    # Without padding the padded offsets are the same tensor: Transformer Engine infers "no
    # padding between sequences" from that identity (keeping FlashAttention eligible).
    cu_padded = cu_real if padded == lengths else torch.tensor(
        [0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_real,
        cu_seqlens_kv=cu_real,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=max(padded),
        max_seqlen_kv=max(padded),
    )
    return MicroBatch(tokens, position_ids, targets, target_mask, shifted, lengths, params, offsets,
                      routed_experts=routed)


def cp_positions(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of a length-`length` sequence held by CP rank `cp_rank`: chunks r and 2·cp-1-r
    of 2·cp equal chunks (`length` must be a multiple of 2·cp)."""
    if length % (2 * cp_size):
        raise ValueError(f"sequence length {length} is not a multiple of 2*cp = {2 * cp_size}")
    chunk = length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def cp_split(mb: MicroBatch, cp_size: int, cp_rank: int) -> MicroBatch:
    """This CP rank's share of a micro-batch (every per-position tensor indexed the same way)."""
    if cp_size == 1:
        return mb
    if mb.packed_seq_params is None:
        index = cp_positions(mb.tokens.shape[1], cp_size, cp_rank)
    else:
        cu = mb.packed_seq_params.cu_seqlens_q_padded.tolist()
        index = torch.cat([start + cp_positions(end - start, cp_size, cp_rank) for start, end in zip(cu[:-1], cu[1:])])

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(1, index.to(t.device))  # fields may live on the GPU (teacher logits)

    return replace(
        mb,
        tokens=take(mb.tokens),
        position_ids=take(mb.position_ids),
        targets=take(mb.targets),
        target_mask=take(mb.target_mask),
        fields={k: take(v) for k, v in mb.fields.items()},
        routed_experts=take(mb.routed_experts) if mb.routed_experts is not None else None,
        cp_index=index,
    )


def cp_merge(shards: list[torch.Tensor], indices: list[torch.Tensor], width: int) -> torch.Tensor:
    """Inverse of `cp_split` for one per-position tensor: place each rank's [B, S/cp, ...] shard
    back at its positions of the full [B, width, ...] tensor."""
    first = shards[0]
    out = first.new_zeros(first.shape[0], width, *first.shape[2:])
    for shard, index in zip(shards, indices):
        out[:, index] = shard
    return out


def plan_micro_batches(
    lengths: list[int], *, micro_batch_size: int | None = None, max_tokens: int | None = None, count_multiple: int = 1
) -> list[list[int]]:
    """Group sequence indices into micro-batches: `micro_batch_size` sequences each, or, with a
    token budget, first-fit-decreasing bins of at most `max_tokens` tokens (dynamic batching).
    `count_multiple`: the number of micro-batches must be a multiple of it (the interleaved
    pipeline schedule runs them in groups of `parallel.pp`); the micro-batches with the most
    sequences are halved until it is."""
    if (micro_batch_size is None) == (max_tokens is None):
        raise ValueError("give exactly one of micro_batch_size or max_tokens")
    if micro_batch_size is not None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        order = list(range(len(lengths)))
        return _to_count_multiple([order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)],
                                  count_multiple)
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i, n = too_long[0]
        raise ValueError(
            f"sequence {i} has {n} tokens, more than train.max_tokens_per_micro_batch={max_tokens}; "
            f"raise the budget to at least the longest prompt + response"
        )
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return _to_count_multiple([sorted(b) for b in bins], count_multiple)


def _to_count_multiple(plan: list[list[int]], multiple: int) -> list[list[int]]:
    """`plan` with its largest micro-batches halved until their number is a multiple of `multiple`."""
    plan = list(plan)
    while len(plan) % multiple:
        largest = max(range(len(plan)), key=lambda b: len(plan[b]))
        members = plan[largest]
        if len(members) < 2:
            raise ValueError(f"{sum(map(len, plan))} sequences cannot make a multiple of {multiple} micro-batches: "
                             f"the interleaved pipeline schedule (parallel.vpp) runs micro-batches in groups of "
                             f"parallel.pp={multiple}; give each rank at least {multiple} sequences per pass")
        plan[largest:largest + 1] = [members[:len(members) // 2], members[len(members) // 2:]]
    return plan
