"""The methods, one record each: what a training step computes for `algorithm.method`.

The step's scoring (`trainer/scoring.py`), its objectives (`trainer/objectives.py`), the
teacher's context (`trainer/teacher.py`) and the config checks read these records; none of them
tests a method's name. Adding a method is one record here, its token-advantage math if it is
new (as `rlsd.py`), a name in `AlgorithmConfig.method` (a test keeps those names and this table
equal) and its preset in `examples/configs/<name>.yaml`. What tells GRPO, DAPO and Dr.GRPO
apart is their presets' settings (`normalize_adv_std`, `dynamic_sampling`, `loss_agg`), not
their records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["METHODS", "Method", "get_method"]

# What each response token's advantage is:
#   sequence: GRPO's group-normalised sequence advantage A on every token;
#   rlsd: A·[(1 − λ) + λ·ŵ_t], ŵ_t from the teacher's log-prob of the token (rlsd.py);
#   opd: log π_T − log π_S of the sampled token (+ c·A with algorithm.opd_reward_weight);
#   none: no advantage: the distillation term carries the whole signal (no surrogate).
TokenAdvantageKind = Literal["sequence", "rlsd", "opd", "none"]
# What the teacher reads before the student's response tokens:
#   none: no teacher;
#   hinted: the question with the dataset's hint in the user turn (algorithm.teacher_template);
#   sibling: SDPO's prompt with a successful sibling's response, or the shortest correct and incorrect
#            siblings' (algorithm.sdpo_demonstrations, sdpo_success_threshold);
#   student_prompt: the student's own prompt, scored by a separate teacher model (OPD).
TeacherContextKind = Literal["none", "hinted", "sibling", "student_prompt"]


@dataclass(frozen=True)
class Method:
    """One RL method as the step sees it (spec §§1–6)."""

    name: str
    token_advantage: TokenAdvantageKind
    teacher_context: TeacherContextKind
    # A distillation term toward the teacher, of the kind `algorithm.distill_loss` names: on the
    # teacher's distribution at each token (jsd, topk) or on the sampled token (sampled).
    distills: bool
    # The recipe's `algorithm.teacher_weights` (its preset's value; the config's default is
    # `live`); `separate` means the method needs a separate teacher model. None: no teacher.
    recipe_teacher_weights: str | None

    @property
    def has_teacher(self) -> bool:
        """The step builds teacher contexts for this method."""
        return self.teacher_context != "none"

    @property
    def reads_teacher_log_probs(self) -> bool:
        """The token advantage reads the teacher's log-prob of each sampled token (RLSD, OPD)."""
        return self.token_advantage in ("rlsd", "opd")

    @property
    def surrogate(self) -> bool:
        """The loss has the clipped policy-gradient surrogate: the token advantages are not all 0
        (sampled distillation turns it on for the others: `objectives.uses_surrogate`)."""
        return self.token_advantage != "none"

    @property
    def separate_teacher(self) -> bool:
        """The teacher is a separate model (`algorithm.teacher_model`), not the policy's weights."""
        return self.recipe_teacher_weights == "separate"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rlsd", token_advantage="rlsd", teacher_context="hinted", distills=False,
           recipe_teacher_weights="frozen_sync"),
    Method("grpo", token_advantage="sequence", teacher_context="none", distills=False, recipe_teacher_weights=None),
    Method("dapo", token_advantage="sequence", teacher_context="none", distills=False, recipe_teacher_weights=None),
    Method("drgrpo", token_advantage="sequence", teacher_context="none", distills=False, recipe_teacher_weights=None),
    Method("opd", token_advantage="opd", teacher_context="student_prompt", distills=False,
           recipe_teacher_weights="separate"),
    Method("opsd", token_advantage="none", teacher_context="hinted", distills=True, recipe_teacher_weights="frozen"),
    Method("sdpo", token_advantage="none", teacher_context="sibling", distills=True, recipe_teacher_weights="ema"),
    Method("grpo_opsd", token_advantage="sequence", teacher_context="hinted", distills=True,
           recipe_teacher_weights="frozen"),
)}


def get_method(name: str) -> Method:
    """The record of method `name` (`algorithm.method`)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"algorithm.method={name!r} is not one of {list(METHODS)}; add a record to "
                         "rlsd_megatron/algorithms/methods.py for a new method") from None
