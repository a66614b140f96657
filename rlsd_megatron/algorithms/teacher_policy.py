"""Which weights score the teacher (spec §2): the live policy, a periodically re-synced frozen
copy, an EMA of the policy, or a separate model (OPD).

The policy is plain tensors keyed by parameter name (the local shards, whatever parallelism
produced them), so it knows nothing of Megatron or process groups. The trainer:

1. calls :meth:`TeacherWeightPolicy.initialize` with the initial policy weights (or restores
   :meth:`~TeacherWeightPolicy.load_state_dict` on resume);
2. scores the teacher with the student's own weights when :attr:`source` is ``"student"``,
   with :meth:`teacher_state` when it is ``"copy"``, with its separate model when ``"separate"``;
3. calls :meth:`on_step` after every optimizer step.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

__all__ = ["TEACHER_MODES", "TeacherWeightPolicy"]

TEACHER_MODES = ("live", "frozen", "frozen_sync", "ema", "separate")

Params = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def _as_dict(params: Params) -> dict[str, torch.Tensor]:
    return dict(params.items()) if isinstance(params, Mapping) else dict(params)


class TeacherWeightPolicy:
    """Holds (and updates) the teacher's copy of the policy weights.

    - ``live``: the current policy weights; no copy (library default, no extra memory).
    - ``frozen``: a copy of the initial policy, never updated (the official OPSD teacher).
    - ``frozen_sync``: a copy of the initial policy, re-synced after every update whose step
      is a multiple of ``sync_interval`` (recipe: 20; the reference syncs after the update, so
      updates 21..40 are scored by the policy as it was after update 20).
    - ``ema``: ``θ_T ← (1 − ema_rate)·θ_T + ema_rate·θ_S`` after every update, starting from
      the initial policy (SDPO: rate 0.05). Kept in ``ema_dtype`` (float32 by default: a
      5 % step is often below bf16's resolution).
    - ``separate``: another model scores the teacher (OPD); nothing to hold.

    ``storage`` in :meth:`initialize` lets the copy live in existing tensors (e.g. a teacher
    model's own parameters), updated in place, instead of fresh clones.
    """

    def __init__(self, mode: str = "live", *, sync_interval: int = 20, ema_rate: float = 0.05,
                 ema_dtype: torch.dtype | None = torch.float32) -> None:
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode {mode!r} is not one of {TEACHER_MODES}.")
        if mode == "frozen_sync" and sync_interval < 1:
            raise ValueError(f"sync_interval={sync_interval} must be >= 1 for frozen_sync.")
        if mode == "ema" and not 0.0 < ema_rate <= 1.0:
            raise ValueError(f"ema_rate={ema_rate} must be in (0, 1] for ema.")
        self.mode = mode
        self.sync_interval = sync_interval
        self.ema_rate = ema_rate
        self.ema_dtype = ema_dtype
        self.last_sync_step = 0
        self._weights: dict[str, torch.Tensor] | None = None

    @property
    def source(self) -> str:
        """``"student"`` (live), ``"copy"`` (frozen, frozen_sync, ema) or ``"separate"``."""
        return {"live": "student", "separate": "separate"}.get(self.mode, "copy")

    @property
    def holds_copy(self) -> bool:
        return self.source == "copy"

    def initialize(self, student_params: Params, *, storage: Mapping[str, torch.Tensor] | None = None) -> None:
        """Take the copy from the initial policy (no-op for ``live``/``separate``)."""
        if not self.holds_copy:
            return
        student = _as_dict(student_params)
        if storage is None:
            dtype = self.ema_dtype if self.mode == "ema" else None
            self._weights = {n: p.detach().to(dtype=dtype or p.dtype, copy=True) for n, p in student.items()}
        else:
            self._weights = dict(storage)
            self._check_names(student)
            self._copy_from(student)
        self.last_sync_step = 0

    def on_step(self, step: int, student_params: Params) -> bool:
        """Update the copy after optimizer step ``step`` (counted from 1). True if it changed."""
        if not self.holds_copy:
            return False
        if self._weights is None:
            raise RuntimeError(f"teacher mode {self.mode!r}: call initialize(initial_params) before "
                               "training, or load_state_dict(...) when resuming.")
        student = _as_dict(student_params)
        self._check_names(student)
        if self.mode == "frozen":
            return False
        if self.mode == "frozen_sync":
            if step % self.sync_interval != 0:
                return False
            self._copy_from(student)
        else:
            with torch.no_grad():
                for name, teacher in self._weights.items():
                    teacher.lerp_(student[name].detach().to(teacher.dtype), self.ema_rate)
        self.last_sync_step = step
        return True

    def teacher_state(self) -> dict[str, torch.Tensor] | None:
        """The teacher's weights by name for ``copy`` modes; None otherwise (use the student's
        own weights for ``live``, the separate model's for ``separate``)."""
        if self.holds_copy and self._weights is None:
            raise RuntimeError(f"teacher mode {self.mode!r} has no weights yet; call initialize().")
        return self._weights

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: mode, schedule, last update step, and the copy (if any)."""
        return {"mode": self.mode, "sync_interval": self.sync_interval, "ema_rate": self.ema_rate,
                "last_sync_step": self.last_sync_step,
                "weights": {n: t.detach() for n, t in (self._weights or {}).items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The mode must match; weights are copied in place when
        this policy already holds a copy (e.g. in ``storage``), else cloned."""
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint teacher mode {state['mode']!r} differs from the configured "
                             f"{self.mode!r}; a resumed run must keep its teacher mode.")
        self.sync_interval = int(state["sync_interval"])
        self.ema_rate = float(state["ema_rate"])
        self.last_sync_step = int(state["last_sync_step"])
        weights = dict(state["weights"])
        if not self.holds_copy:
            return
        if self._weights is None:
            self._weights = {n: t.detach().clone() for n, t in weights.items()}
        else:
            self._check_names(weights)
            self._copy_from(weights)

    def _check_names(self, other: Mapping[str, torch.Tensor]) -> None:
        mine, theirs = set(self._weights), set(other)
        if mine != theirs:
            raise ValueError(f"teacher copy and given parameters differ: missing {sorted(mine - theirs)[:5]}, "
                             f"unexpected {sorted(theirs - mine)[:5]}.")

    def _copy_from(self, source: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, teacher in self._weights.items():
                teacher.copy_(source[name].detach())
