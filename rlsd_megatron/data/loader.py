"""Deterministic, resumable prompt batches, sharded over data-parallel ranks.

The rows of a dataset form one endless stream: epoch ``e`` visits every row once, in the
order :func:`epoch_order` gives (a permutation seeded by ``(seed, e)``, or file order without
shuffling), and the next epoch follows straight on, so no row is ever dropped (a global batch that
straddles two epochs may hold a row twice, once from each). The position is ``(epoch, index)``: the next row is
``epoch_order(...)[index]``. Every rank holds the same position and takes its own contiguous
slice of each global batch, so the ranks' batches are disjoint and together are the global
batch, and a checkpoint's ``state_dict`` resumes the stream exactly, even with a different
number of ranks or batch size (the position counts rows, not batches).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlsd_megatron.data.prompts import PromptDataset, PromptRow
from rlsd_megatron.data.readers import DataError

__all__ = ["PromptLoader", "epoch_order", "validation_rows"]


def epoch_order(num_rows: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Row order of one epoch: ``[num_rows]`` int64, a permutation seeded by ``(seed, epoch)``.

    PCG64 seeded by the pair gives the same order on every machine and NumPy ≥ 1.17; without
    ``shuffle`` it is ``0..num_rows-1``.
    """
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_rows).astype(np.int64)


class PromptLoader:
    """Global batches of ``global_batch_size`` rows; this rank gets its share of each.

    Rank ``dp_rank`` of ``dp_size`` receives rows ``[dp_rank·b, (dp_rank+1)·b)`` of every global
    batch, ``b = global_batch_size / dp_size`` (which must divide). ``seed`` should be the run's
    seed (``train.seed``), ``shuffle`` ``data.shuffle``.
    """

    def __init__(self, dataset: PromptDataset, *, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if global_batch_size < 1 or dp_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                             f"data-parallel size {dp_size}.")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, {dp_size}).")
        if len(dataset) == 0:
            raise ValueError(f"{dataset.name} has no rows.")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.dataset), seed=self.seed, epoch=epoch, shuffle=self.shuffle))
        return self._order[1]

    def next_indices(self) -> list[int]:
        """Dataset indices of this rank's share of the next global batch; advances the position."""
        taken: list[int] = []
        while len(taken) < self.global_batch_size:
            rows = self._epoch_rows(self.epoch)
            take = min(self.global_batch_size - len(taken), len(rows) - self.index)
            taken.extend(rows[self.index: self.index + take].tolist())
            self.index += take
            if self.index == len(rows):
                self.epoch, self.index = self.epoch + 1, 0
        share = self.global_batch_size // self.dp_size
        return taken[self.dp_rank * share: (self.dp_rank + 1) * share]

    def next_batch(self) -> list[PromptRow]:
        """This rank's rows of the next global batch."""
        return [self.dataset[i] for i in self.next_indices()]

    def state_dict(self) -> dict[str, Any]:
        """The position (same on every rank): epoch, index, seed, shuffle and the dataset size."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
                "num_rows": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the seed, shuffling and dataset size must match."""
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("num_rows", len(self.dataset))):
            if state.get(key) != mine:
                raise ValueError(f"the checkpoint's data position was saved with {key}={state.get(key)!r} but this "
                                 f"run has {key}={mine!r}; the stream would not continue where it stopped (same "
                                 "data files, data.bad_rows, train.seed and data.shuffle are needed to resume).")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self.dataset):
            raise ValueError(f"invalid data position epoch={epoch}, index={index} for {len(self.dataset)} rows.")
        self.epoch, self.index = epoch, index


def validation_rows(dataset: PromptDataset, *, dp_rank: int = 0, dp_size: int = 1) -> list[PromptRow]:
    """This rank's validation rows, in order: rows ``dp_rank, dp_rank + dp_size, …`` (disjoint
    across ranks, together every row once; counts differ by at most one). Raises DataError when
    some rank would get none: validation and the warm start's accuracy checks are collectives
    over the data-parallel ranks, which a rank without rows would skip (the others then hang)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, {dp_size}).")
    if len(dataset) < dp_size:
        raise DataError(f"the validation data (data.val_files) hold {len(dataset)} row(s), fewer than the {dp_size} "
                        "data-parallel replicas that each validate a share of them: give at least one row per replica")
    return [dataset[i] for i in range(dp_rank, len(dataset), dp_size)]
