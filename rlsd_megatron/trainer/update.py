"""The policy update on one rollout batch: `ppo_epochs` × `optimizer_steps_per_batch` optimizer steps.

Each optimizer step takes every `optimizer_steps_per_batch`-th sequence of this rank's batch, its
loss normalised by counts summed over the data-parallel ranks (`loss_normalisers`; a distillation
term by those of its own tokens, `distill_mask`), so that micro-batching and data parallelism
leave the gradient unchanged. Distillation methods pass the teacher's inputs; their steps get the
teacher's logits one chunk of micro-batches at a time (trainer/distillation.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlsd_megatron import algorithms as alg
from rlsd_megatron.config import Config
from rlsd_megatron.trainer import distillation, objectives
from rlsd_megatron.trainer.rollouts import response_tensors


def update_policy(learner, cfg: Config, sequences: list[torch.Tensor], fields: dict[str, list[torch.Tensor]],
                  teacher: distillation.TeacherInputs | None = None, *, dp_group, step: int | None = None,
                  images: list | None = None) -> dict[str, float]:
    """Optimizer steps over this rank's `sequences` (token ids [L_i], with their `images` for a
    vision-language policy) with per-token `fields` aligned with them (`loss_mask`, `old_logp`,
    `advantages`, ...; see `policy_loss_fn`); returns the last step's `Learner.train_step`
    statistics. `step`: the RL step (from 1), which the loss reads when it derives the token
    advantages itself (trainer/in_update.py)."""
    steps = cfg.train.optimizer_steps_per_batch
    stats: dict[str, float] = {}
    for _ in range(cfg.train.ppo_epochs):
        for part in range(steps):
            idx = list(range(part, len(sequences), steps))
            normalisers = _global_counts([fields["loss_mask"][i] for i in idx], dp_group)
            # The distillation term's own counts (its tokens: those with a teacher). A step where no
            # sample has one (SDPO without a successful sibling) has no distillation term: 1 keeps 0/0 out.
            distill_normalisers = {k: v.clamp(min=1) for k, v in _global_counts(
                [fields["distill_mask"][i] for i in idx], dp_group).items()} if "distill_mask" in fields else None
            batches, plan = learner.micro_batches([sequences[i] for i in idx],
                                                  {k: [v[i] for i in idx] for k, v in fields.items()},
                                                  [images[i] for i in idx] if images is not None else None)
            loss_fn = objectives.policy_loss_fn(cfg, normalisers, distill_normalisers=distill_normalisers, step=step)
            if teacher is None:
                stats = learner.train_step(batches, loss_fn)
            else:
                stats = distillation.train_step_with_teacher(learner, batches, plan, teacher.select(idx), loss_fn,
                                                             chunk_micro_batches=distillation.chunk_micro_batches(cfg))
    return stats


def _global_counts(masks: list[torch.Tensor], dp_group) -> dict[str, torch.Tensor]:
    """`loss_normalisers` of this rank's per-sequence `masks`, summed over the data-parallel ranks."""
    counts = alg.loss_normalisers(response_tensors(masks))
    for value in counts.values():
        dist.all_reduce(value, group=dp_group)
    return counts
