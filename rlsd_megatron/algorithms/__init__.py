"""Pure RL math per method: the method table, advantages, surrogate losses, rollout corrections.

No process groups, config objects or I/O in here; the trainer wires these to the model.
`methods.py` holds one record per method (what a step computes for it), `rlsd.py` RLSD's token
advantages and metrics. The teacher's prompt (templating, not math) is `data/teacher_context.py`.
Conventions: ``B`` rollouts, flat and group-contiguous (the G rollouts of prompt 0, then prompt
1, ...), ``T`` response positions; masks are True/nonzero on real response tokens; outputs are
float32 (half/bf16 inputs are upcast, float64 stays float64).
"""

from rlsd_megatron.algorithms.advantages import group_advantages, opd_token_advantages
from rlsd_megatron.algorithms.methods import METHODS, Method, get_method
from rlsd_megatron.algorithms.policy_loss import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    kl_penalty,
    loss_normalisers,
    policy_loss,
)
from rlsd_megatron.algorithms.rlsd import (
    RLSDTokenWeights,
    rlsd_advantages_and_metrics,
    rlsd_lambda,
    rlsd_metrics,
    rlsd_token_advantages,
    rlsd_token_weights,
)
from rlsd_megatron.algorithms.rollout_corrections import (
    dynamic_sampling_keep_mask,
    soft_overlong_penalty,
    tis_weights,
)
from rlsd_megatron.algorithms.sdpo import select_sdpo_demonstrations, select_sdpo_paper_demonstrations
from rlsd_megatron.algorithms.teacher_policy import TEACHER_MODES, TeacherWeightPolicy

__all__ = [
    "LOSS_AGGREGATIONS",
    "METHODS",
    "Method",
    "RLSDTokenWeights",
    "TEACHER_MODES",
    "TeacherWeightPolicy",
    "aggregate_loss",
    "dynamic_sampling_keep_mask",
    "get_method",
    "group_advantages",
    "kl_penalty",
    "loss_normalisers",
    "opd_token_advantages",
    "policy_loss",
    "rlsd_advantages_and_metrics",
    "rlsd_lambda",
    "rlsd_metrics",
    "rlsd_token_advantages",
    "rlsd_token_weights",
    "select_sdpo_demonstrations",
    "select_sdpo_paper_demonstrations",
    "soft_overlong_penalty",
    "tis_weights",
]
