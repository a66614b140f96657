"""Micro-batch layouts (padded, packed THD), their inverse, CP sharding and micro-batch planning."""

from __future__ import annotations

import pytest
import torch

from rlsd_megatron.learner.batch import (
    cp_merge,
    cp_positions,
    cp_split,
    packed_micro_batch,
    padded_micro_batch,
    plan_micro_batches,
)

SEQS = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10]), torch.tensor([11, 12, 13])]
MASKS = [torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])]


def test_padded_layout_shifts_targets_and_fields():
    mb = padded_micro_batch(SEQS, {"mask": MASKS}, pad_to_multiple=4)
    assert mb.tokens.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 0]]
    # Position t predicts token t+1.
    assert mb.targets.tolist() == [[6, 7, 8, 0], [10, 0, 0, 0], [12, 13, 0, 0]]
    assert mb.target_mask.tolist() == [[True, True, True, False], [True, False, False, False],
                                       [True, True, False, False]]
    assert mb.fields["mask"].tolist() == [[0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert mb.position_ids[1].tolist() == [0, 1, 2, 3]


def test_packed_layout_with_padding_to_multiple():
    mb = packed_micro_batch(SEQS, {"mask": MASKS}, pad_to_multiple=2)
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 0]]
    assert mb.targets.tolist() == [[6, 7, 8, 0, 10, 0, 12, 13, 0, 0]]
    assert mb.offsets == [0, 4, 6]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3]]
    params = mb.packed_seq_params
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 4, 6, 9]
    assert params.cu_seqlens_q_padded.tolist() == [0, 4, 6, 10]
    assert params.max_seqlen_q == 4


def test_packed_total_padding_extends_only_the_last_sequence():
    # CP=2 chunks (each sequence a multiple of 4) and 16 rows on each of 2 ranks: T a multiple of 32.
    mb = packed_micro_batch(SEQS, pad_to_multiple=4, pad_total_to_multiple=32)
    assert mb.tokens.shape == (1, 32) and mb.offsets == [0, 4, 8]
    assert mb.packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 4, 8, 32]
    assert mb.packed_seq_params.cu_seqlens_q.tolist() == [0, 4, 6, 9]
    assert mb.position_ids[0, 8:].tolist() == list(range(24))
    # No padding at all: one offsets tensor, which TE reads as "no padding between sequences".
    exact = packed_micro_batch([torch.arange(4), torch.arange(4)], pad_total_to_multiple=8)
    assert exact.packed_seq_params.cu_seqlens_q_padded is exact.packed_seq_params.cu_seqlens_q


@pytest.mark.parametrize("layout", [padded_micro_batch, packed_micro_batch])
def test_to_sequences_inverts_the_shift(layout):
    mb = layout(SEQS, {"mask": MASKS})
    back = mb.to_sequences(mb.targets.float())
    for seq, values in zip(SEQS, back):
        # out[t] is what was predicted for token t (from position t-1); token 0 gets 0.
        assert values.tolist() == [0.0, *seq[1:].float().tolist()]
    masks_back = mb.to_sequences(mb.fields["mask"])
    for mask, values in zip(MASKS, masks_back):
        assert values[1:].tolist() == mask[1:].tolist()


def test_cp_positions_balance_causal_work():
    # 2·cp = 4 chunks of 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="not a multiple of 2\\*cp = 4"):
        cp_positions(6, 2, 0)


@pytest.mark.parametrize("layout", [padded_micro_batch, packed_micro_batch])
def test_cp_split_and_merge_round_trip(layout):
    cp = 2
    mb = layout(SEQS, {"mask": MASKS}, pad_to_multiple=2 * cp)
    shards = [cp_split(mb, cp, rank) for rank in range(cp)]
    for shard in shards:
        assert shard.tokens.shape[1] == mb.tokens.shape[1] // cp
        # Every per-position tensor is indexed the same way.
        assert torch.equal(shard.targets, mb.targets[:, shard.cp_index])
        assert torch.equal(shard.fields["mask"], mb.fields["mask"][:, shard.cp_index])
    merged = cp_merge([s.targets for s in shards], [s.cp_index for s in shards], mb.tokens.shape[1])
    assert torch.equal(merged, mb.targets)
    if mb.packed_seq_params is not None:
        # Packed: every sequence is split on its own, so each shard holds a piece of each.
        assert shards[0].cp_index.tolist() == [0, 3, 4, 7, 8, 11]


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        padded_micro_batch([torch.tensor([1])])
    with pytest.raises(ValueError, match="field 'mask' of sequence 1 has shape"):
        padded_micro_batch(SEQS, {"mask": [MASKS[0], MASKS[0], MASKS[2]]})


def test_plan_by_count_and_by_token_budget():
    assert plan_micro_batches([5, 5, 5, 5, 5], micro_batch_size=2) == [[0, 1], [2, 3], [4]]
    plan = plan_micro_batches([6, 3, 5, 2, 4], max_tokens=8)
    assert sorted(i for b in plan for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([6, 3, 5, 2, 4][i] for i in b) <= 8 for b in plan)
    assert len(plan) == 3  # 20 tokens need at least 3 bins of 8
    with pytest.raises(ValueError, match="sequence 0 has 9 tokens, more than train.max_tokens_per_micro_batch=8"):
        plan_micro_batches([9], max_tokens=8)
    with pytest.raises(ValueError, match="exactly one of"):
        plan_micro_batches([1], micro_batch_size=1, max_tokens=4)


def test_plan_makes_a_multiple_of_the_pipeline_groups():
    """The interleaved schedule takes micro-batches in groups of pp: the fullest ones are halved."""
    assert plan_micro_batches([5] * 5, micro_batch_size=2, count_multiple=4) == [[0], [1], [2, 3], [4]]
    lengths = [6, 3, 5, 2, 4, 1]
    plan = plan_micro_batches(lengths, max_tokens=8, count_multiple=4)
    assert len(plan) == 4 and sorted(i for b in plan for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 8 for b in plan)
    assert plan_micro_batches([5] * 8, micro_batch_size=2, count_multiple=4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match=r"3 sequences cannot make a multiple of 4 micro-batches"):
        plan_micro_batches([5, 5, 5], micro_batch_size=1, count_multiple=4)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_routed_experts_stay_at_their_tokens(layout):
    """The engine's experts are a model input (the router runs on token t at position t): unlike the
    loss fields they are not shifted; padding is -1 (no record: the router chooses); CP splits them
    with the tokens."""
    from rlsd_megatron.learner.batch import ROUTED_EXPERTS

    seqs = [torch.arange(1, 6), torch.arange(10, 13)]
    routed = [torch.arange(5 * 2 * 2).reshape(5, 2, 2).to(torch.int16), -torch.ones(3, 2, 2, dtype=torch.int16)]
    routed[1][:2] = 7
    fields = {ROUTED_EXPERTS: routed, "loss_mask": [torch.ones(5), torch.ones(3)]}
    mb = padded_micro_batch(seqs, fields, pad_to_multiple=4) if layout == "padded" else \
        packed_micro_batch(seqs, fields, pad_to_multiple=4)
    assert ROUTED_EXPERTS not in mb.fields and "loss_mask" in mb.fields
    for i, (seq, want) in enumerate(zip(seqs, routed)):
        row, start = (i, 0) if layout == "padded" else (0, mb.offsets[i])
        assert torch.equal(mb.tokens[row, start:start + len(seq)], seq)
        assert torch.equal(mb.routed_experts[row, start:start + len(seq)], want)
    real = torch.zeros(mb.tokens.shape, dtype=torch.bool)
    for i, seq in enumerate(seqs):
        row, start = (i, 0) if layout == "padded" else (0, mb.offsets[i])
        real[row, start:start + len(seq)] = True
    assert (mb.routed_experts[~real] == -1).all() and mb.routed_experts.shape == (*mb.tokens.shape, 2, 2)
    shard = cp_split(mb, 2, 1)
    assert torch.equal(shard.routed_experts, mb.routed_experts[:, shard.cp_index])
    assert padded_micro_batch(seqs, {"loss_mask": fields["loss_mask"]}).routed_experts is None
