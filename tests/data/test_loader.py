"""PromptLoader: deterministic shuffling, complete epochs, exact resume, disjoint DP shards."""

import pytest

from rlsd_megatron.data import PromptDataset, PromptLoader, PromptRow, epoch_order, validation_rows
from rlsd_megatron.data.readers import DataError


class Numbers(PromptDataset):
    """Row i asks for i."""

    def __init__(self, n):
        self.n, self.name, self.stats = n, f"numbers/{n}", {"rows": n}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return PromptRow(self._check_index(i), f"q{i}", str(i), None, [i], self.name)


def batches(loader, count):
    return [loader.next_indices() for _ in range(count)]


def test_deterministic_shuffle_and_complete_epochs():
    data = Numbers(10)
    first = batches(PromptLoader(data, global_batch_size=4, seed=3), 5)
    assert first == batches(PromptLoader(data, global_batch_size=4, seed=3), 5)
    assert first != batches(PromptLoader(data, global_batch_size=4, seed=4), 5)
    stream = [i for batch in first for i in batch]  # 20 rows = exactly 2 epochs, batches straddle them
    assert stream[:10] == epoch_order(10, seed=3, epoch=0).tolist()
    assert stream[10:] == epoch_order(10, seed=3, epoch=1).tolist()
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new order each epoch
    assert PromptLoader(data, global_batch_size=4, shuffle=False).next_indices() == [0, 1, 2, 3]
    rows = PromptLoader(data, global_batch_size=2, seed=3).next_batch()
    assert [r.index for r in rows] == first[0][:2] and rows[0].answer == str(first[0][0])


def test_resume_continues_the_stream_exactly():
    data = Numbers(23)
    reference = PromptLoader(data, global_batch_size=6, seed=11)
    expected = batches(reference, 9)
    interrupted = PromptLoader(data, global_batch_size=6, seed=11)
    batches(interrupted, 4)
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "index": 1, "seed": 11, "shuffle": True, "num_rows": 23}
    resumed = PromptLoader(data, global_batch_size=6, seed=11)
    resumed.load_state_dict(state)
    assert batches(resumed, 5) == expected[4:]
    # The position counts rows: resuming on 3 ranks gives the same global batches.
    shards = [PromptLoader(data, global_batch_size=6, dp_rank=r, dp_size=3, seed=11) for r in range(3)]
    for shard in shards:
        shard.load_state_dict(state)
    for step in range(4, 9):
        assert [i for shard in shards for i in shard.next_indices()] == expected[step]


@pytest.mark.parametrize("rows", [48, 50])
def test_data_parallel_shards_are_disjoint_and_complete(rows):
    data = Numbers(rows)
    whole = batches(PromptLoader(data, global_batch_size=8, seed=0), 12)
    shards = [batches(PromptLoader(data, global_batch_size=8, dp_rank=r, dp_size=4, seed=0), 12) for r in range(4)]
    for step in range(12):
        parts = [shards[r][step] for r in range(4)]
        assert all(len(p) == 2 for p in parts)
        assert [i for p in parts for i in p] == whole[step]  # the ranks' shares are the global batch, in order
        if rows == 48:  # batches within one epoch: no row twice
            assert len({i for p in parts for i in p}) == 8
    # Every row once per epoch across all ranks, even when batches straddle epochs.
    stream = [i for step in range(12) for r in range(4) for i in shards[r][step]]
    assert sorted(stream[:rows]) == list(range(rows))
    with pytest.raises(ValueError, match="global_batch_size=8 must be a positive multiple of the data-parallel size 3"):
        PromptLoader(data, global_batch_size=8, dp_size=3)
    val = [validation_rows(Numbers(50), dp_rank=r, dp_size=4) for r in range(4)]
    assert sorted(row.index for shard in val for row in shard) == list(range(50))
    assert [len(shard) for shard in val] == [13, 13, 12, 12]
    # A rank without rows would skip the validation collectives the others wait in.
    assert [len(validation_rows(Numbers(4), dp_rank=r, dp_size=4)) for r in range(4)] == [1, 1, 1, 1]
    with pytest.raises(DataError, match=r"the validation data \(data\.val_files\) hold 3 row\(s\), fewer than the 4 "
                                        r"data-parallel replicas"):
        validation_rows(Numbers(3), dp_rank=0, dp_size=4)


def test_resume_refuses_a_different_stream():
    loader = PromptLoader(Numbers(10), global_batch_size=2, seed=1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="saved with num_rows=10 but this run has num_rows=11"):
        PromptLoader(Numbers(11), global_batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with seed=1 but this run has seed=2"):
        PromptLoader(Numbers(10), global_batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="invalid data position"):
        loader.load_state_dict({**state, "index": 10})
