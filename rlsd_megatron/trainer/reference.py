"""The KL term's reference policy (`algorithm.kl_coef` > 0, textbook GRPO): log-probs of the
rollout tokens, in the student's own prompt context, under frozen reference weights.

- Default (`algorithm.kl_reference` unset): the policy RL starts from. A frozen copy of the
  learner's weights (`TeacherWeightPolicy` in `frozen` mode, the OPSD teacher's mechanism),
  scored by swapping it into the learner (`Learner.use_weights`, no second model). `restart()`
  takes the copy again when the starting weights are replaced (warm start, `checkpoint.init_from`),
  and the copy goes into training-state checkpoints: after updates it cannot be re-derived.
- `algorithm.kl_reference=PATH`: a `FrozenModel` loaded from that checkpoint (any architecture
  with the policy's vocabulary), re-loaded from the path on resume; nothing is saved.
"""

from __future__ import annotations

from typing import Any

import torch

from rlsd_megatron import algorithms as alg
from rlsd_megatron.checkpoint.directory import CheckpointError
from rlsd_megatron.config import Config
from rlsd_megatron.learner.runner import ModelRunner, PerTokenFn


class KLReference:
    """Frozen reference weights for the KL term and the log-probs they give (see module doc)."""

    def __init__(self, cfg: Config, learner: ModelRunner, *, impl: str = "local"):
        from rlsd_megatron.learner.frozen_model import FrozenModel

        self.learner = learner
        path = cfg.algorithm.kl_reference
        self.model = FrozenModel(cfg, path, setting="algorithm.kl_reference", impl=impl) if path else None
        self.copy = alg.TeacherWeightPolicy("frozen") if path is None else None
        self.restart()

    def restart(self) -> None:
        """The policy RL starts from is the learner's current weights: copy them (no-op for a
        reference loaded from a checkpoint)."""
        if self.copy is not None:
            self.copy.initialize(self.learner.local_weights())

    def weights(self) -> dict[str, torch.Tensor] | None:
        """This rank's shards of the reference copy by local name; None for a loaded model."""
        return self.copy.teacher_state() if self.copy is not None else None

    def outputs(self, sequences: list[torch.Tensor], per_token: PerTokenFn, images: list | None = None
                ) -> dict[str, list[torch.Tensor]]:
        """`per_token` outputs of the reference on whole `sequences` with their `images` (one
        [L, ...] tensor per sequence, aligned with its tokens; see `ModelRunner.forward_sequences`)."""
        if self.model is not None:
            return self.model.forward_sequences(sequences, per_token, images)
        with self.learner.use_weights(self.weights()):
            return self.learner.forward_sequences(sequences, per_token, images)

    def state_dict(self) -> dict[str, Any] | None:
        """What a training-state checkpoint keeps: the copy (None for a loaded model)."""
        return self.copy.state_dict() if self.copy is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()`; a checkpoint without a copy cannot give the initial policy back."""
        if self.copy is None:
            return
        if state is None:
            raise CheckpointError(
                "this run's KL reference is the policy it started from (algorithm.kl_coef > 0, no "
                "algorithm.kl_reference), and the checkpoint holds no copy of it (it was written with kl_coef=0 or "
                "with a kl_reference path); resume with the settings it was written with, or name the reference "
                "with algorithm.kl_reference=<checkpoint>")
        self.copy.load_state_dict(state)
