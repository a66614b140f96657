"""What a step's score and update phases consume, from its rollouts (`StepScoring`).

- score: the student's log-probs of the rollout tokens (the ratio's "old" log-probs: with one
  optimizer step per rollout batch they are the current policy's, so the first ratio is exactly
  1) and how far they are from the engine's, the KL reference's (`reference.py`), and for teacher
  methods the teacher's in its context (`teacher.py`);
- advantages: group-normalised rewards → the method's token advantages (`objectives.py`, by the
  method's record in `algorithms/methods.py`);
- update inputs: the loss's per-token fields of each student sequence, and for a distillation
  loss on distributions what the teacher scores inside each update (`distillation.py`).

With `train.student_log_probs_in_update` the score phase runs no student forward: the student's
log-probs, the advantages, the TIS weights and the mismatch come from the update's own forward,
and the update gets the fields they are derived from instead (`in_update.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlsd_megatron import algorithms as alg
from rlsd_megatron.config import Config
from rlsd_megatron.data.prompts import PromptDataset
from rlsd_megatron.learner.batch import ROUTED_EXPERTS
from rlsd_megatron.rollout.mismatch import MismatchMonitor
from rlsd_megatron.trainer import distillation, objectives
from rlsd_megatron.trainer.in_update import student_free_fields
from rlsd_megatron.trainer.off_policy import old_log_probs
from rlsd_megatron.trainer.rollouts import Rollouts, StepScores, response_tensors
from rlsd_megatron.trainer.teacher import teacher_contexts, teacher_response_outputs

if TYPE_CHECKING:
    from rlsd_megatron.trainer.reference import KLReference


class StepScoring:
    """Scores a step's rollouts and assembles the update's inputs (see module doc) with the run's
    `learner`, KL `reference` (None without a KL term), `teacher` policy (`TeacherWeightPolicy`,
    its copy as the step sees it), OPD's separate `teacher_model` (None otherwise) and `dataset`
    (the teacher's contexts); owns the engine-mismatch monitor. `dp_group`: the data-parallel group
    the mismatch is reduced over."""

    def __init__(self, cfg: Config, learner, dataset: PromptDataset, *, reference: KLReference | None,
                 teacher: alg.TeacherWeightPolicy, teacher_model=None, dp_group=None):
        self.cfg, self.learner, self.dataset = cfg, learner, dataset
        self.reference, self.teacher, self.teacher_model = reference, teacher, teacher_model
        self.dp_group = dp_group
        self.mismatch = MismatchMonitor(cfg.rollout.max_logprob_mismatch)

    def score(self, rollouts: Rollouts, *, step: int) -> StepScores:
        """The log-probs the step's advantages and loss read: the student's (the ratio's "old"
        log-probs), the KL reference's, and for teacher methods the teacher's in its context; and
        how far the student's are from the engine's weights of version `step` - 1. With
        `train.student_log_probs_in_update` the student's are left to the update's forward
        (trainer/in_update.py): None here."""
        algorithm = self.cfg.algorithm
        if self.cfg.rollout.routing_replay and rollouts.routed_experts is None:
            # Scoring and the update would route freely: a silent fallback the metrics would not show.
            raise RuntimeError("rollout.routing_replay is on but this step's rollouts carry no routed experts "
                               "(an engine that did not record them, or a checkpointed batch saved without them)")
        sequences, images = rollouts.sequences(), rollouts.images()
        in_update = self.cfg.train.student_log_probs_in_update
        # Routing replay: the student's forwards route by the engine's experts; the reference's and the
        # teacher's do not (learner.routing_replay says why).
        student = None if in_update else self.log_probs(sequences, images, rollouts.routed_experts_on_sequences())
        reference = self.reference.outputs(sequences, self._log_prob_fn, images)["logp"] \
            if self.reference is not None else None
        contexts = teacher_contexts(algorithm, rollouts, self.dataset, think_tag=self.cfg.reward.think_tag) \
            if alg.get_method(algorithm.method).has_teacher else None
        teacher_logp = teacher_response_outputs(
            contexts, self._log_prob_fn, learner=self.learner, weights=self.teacher.teacher_state(),
            teacher_model=self.teacher_model)["logp"] if objectives.uses_teacher_log_probs(algorithm) else None
        mismatch = None if in_update else self.mismatch.check(
            response_tensors(rollouts.on_responses(student)), response_tensors(rollouts.engine_log_probs),
            rollouts.padded_response_mask(), group=self.dp_group, version=step - 1)
        return StepScores(sequences, student, reference, contexts, teacher_logp, mismatch)

    def advantages(self, rollouts: Rollouts, scores: StepScores, *, step: int) -> objectives.TokenAdvantages | None:
        """Group-normalised sequence advantages of the rewards → the method's token advantages at RL
        `step`; None when the update computes them (no student log-probs yet: trainer/in_update.py)."""
        if scores.student is None:
            return None
        mask = rollouts.padded_response_mask()
        width = mask.shape[1]
        contexts = scores.teacher_contexts
        return objectives.token_advantages(
            self.cfg.algorithm, step, objectives.sequence_advantages(self.cfg, rollouts.rewards), mask,
            response_tensors(rollouts.on_responses(scores.student), width),
            response_tensors(scores.teacher, width) if scores.teacher is not None else None,
            teacher_mask=torch.tensor([c.has_teacher for c in contexts]) if contexts is not None else None)

    def update_inputs(self, rollouts: Rollouts, scores: StepScores, advantages: objectives.TokenAdvantages | None
                      ) -> tuple[dict[str, list[torch.Tensor]], distillation.TeacherInputs | None]:
        """The loss's per-token fields of each student sequence (`objectives.policy_loss_fn`), and
        for a distillation loss on distributions what the teacher scores inside each update."""
        algorithm, masks = self.cfg.algorithm, rollouts.response_mask()
        contexts = scores.teacher_contexts
        if advantages is None:  # what the student's log-probs give is derived in the loss
            fields = {"loss_mask": masks, **student_free_fields(
                rollouts, objectives.sequence_advantages(self.cfg, rollouts.rewards), scores.teacher,
                [c.has_teacher for c in contexts] if contexts is not None else None)}
        else:
            old = old_log_probs(rollouts, scores.student, off_policy=bool(self.cfg.train.off_policy_steps),
                                tis=bool(algorithm.tis_cap))
            fields = {"old_logp": old, "loss_mask": masks, "advantages": rollouts.on_sequences(advantages.values)}
        if scores.reference is not None:
            fields["ref_logp"] = scores.reference
        if rollouts.routed_experts is not None:
            fields[ROUTED_EXPERTS] = rollouts.routed_experts_on_sequences()
        if algorithm.tis_cap and advantages is not None:
            fields["tis_weight"] = rollouts.on_sequences(alg.tis_weights(
                response_tensors(rollouts.on_responses(scores.student)), response_tensors(rollouts.engine_log_probs),
                rollouts.padded_response_mask(), cap=algorithm.tis_cap))
        if objectives.uses_distillation(algorithm) or objectives.uses_sampled_distillation(algorithm):
            # The distillation's tokens (a sample without a teacher has none): its normaliser (update.py).
            fields["distill_mask"] = [m * float(c.has_teacher) for m, c in zip(masks, contexts)]
        if not objectives.uses_distillation(algorithm):
            return fields, None
        updates = self.cfg.train.ppo_epochs * self.cfg.train.optimizer_steps_per_batch
        weights = distillation.teacher_weights_for_update(self.teacher.teacher_state(), self.learner, updates)
        return fields, distillation.TeacherInputs(contexts, rollouts.prompt_lengths(), weights)

    def _log_prob_fn(self, logits: torch.Tensor, mb) -> dict[str, torch.Tensor]:
        from rlsd_megatron.ops import token_log_probs

        return {"logp": token_log_probs(logits, mb.targets.to(logits.device), temperature=self.cfg.rollout.temperature,
                                        vocab_size=self.cfg.model.vocab_size)}

    def log_probs(self, sequences: list[torch.Tensor], images: list | None = None,
                  routed_experts: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-token log-probs under the learner's current weights (aligned with tokens), the
        sequences' `images` in context (a vision-language policy), routed by the engine's
        `routed_experts` when given (routing replay)."""
        return self.learner.forward_sequences(sequences, self._log_prob_fn, images, routed_experts)["logp"]
