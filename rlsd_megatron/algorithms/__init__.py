"""Pure RL math per method: advantages, surrogate losses, rollout corrections, teacher context.

No process groups, config objects or I/O in here; the trainer wires these to the model.
Conventions: ``B`` rollouts, flat and group-contiguous (the G rollouts of prompt 0, then prompt
1, ...), ``T`` response positions; masks are True/nonzero on real response tokens; outputs are
float32 (half/bf16 inputs are upcast, float64 stays float64).
"""

from rlsd_megatron.algorithms.advantages import (
    RLSDTokenWeights,
    group_advantages,
    opd_token_advantages,
    rlsd_lambda,
    rlsd_token_advantages,
    rlsd_token_weights,
)
from rlsd_megatron.algorithms.policy_loss import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    kl_penalty,
    loss_normalisers,
    policy_loss,
)
from rlsd_megatron.algorithms.rollout_corrections import (
    dynamic_sampling_keep_mask,
    logprob_mismatch,
    soft_overlong_penalty,
    tis_weights,
)
from rlsd_megatron.algorithms.teacher_context import (
    RLSD_TEACHER_TEMPLATE,
    SDPO_TEACHER_TEMPLATE,
    TeacherBatch,
    TeacherContextBuilder,
    TeacherSequence,
    check_teacher_template,
    collate_teacher_sequences,
    hf_chat_renderer,
    hf_text_truncator,
    remove_thinking,
    select_sdpo_demonstrations,
)
from rlsd_megatron.algorithms.teacher_policy import TEACHER_MODES, TeacherWeightPolicy

__all__ = [
    "LOSS_AGGREGATIONS",
    "RLSD_TEACHER_TEMPLATE",
    "RLSDTokenWeights",
    "SDPO_TEACHER_TEMPLATE",
    "TEACHER_MODES",
    "TeacherBatch",
    "TeacherContextBuilder",
    "TeacherSequence",
    "TeacherWeightPolicy",
    "aggregate_loss",
    "check_teacher_template",
    "collate_teacher_sequences",
    "dynamic_sampling_keep_mask",
    "group_advantages",
    "hf_chat_renderer",
    "hf_text_truncator",
    "kl_penalty",
    "logprob_mismatch",
    "loss_normalisers",
    "opd_token_advantages",
    "policy_loss",
    "remove_thinking",
    "rlsd_lambda",
    "rlsd_token_advantages",
    "rlsd_token_weights",
    "select_sdpo_demonstrations",
    "soft_overlong_penalty",
    "tis_weights",
]
