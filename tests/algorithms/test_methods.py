"""The method table against the config's names, the presets and what the objectives derive from it."""

import typing
from pathlib import Path

import pytest

from rlsd_megatron.algorithms.methods import METHODS, get_method
from rlsd_megatron.config import AlgorithmConfig, load_config
from rlsd_megatron.trainer import objectives

PRESETS = Path(__file__).resolve().parents[2] / "examples" / "configs"


def test_the_table_has_exactly_the_config_names():
    names = typing.get_args(typing.get_type_hints(AlgorithmConfig)["method"])
    assert list(METHODS) == list(names)
    with pytest.raises(ValueError, match=r"algorithm.method='ppo' is not one of \['rlsd', 'grpo'"):
        get_method("ppo")


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_has_a_preset_with_its_recipe_teacher(name):
    method = METHODS[name]
    algorithm = load_config(PRESETS / f"{name}.yaml", ["algorithm.teacher_model=/ckpt/teacher"]
                            if method.separate_teacher else []).algorithm
    assert algorithm.method == name
    if method.recipe_teacher_weights is not None:
        assert algorithm.teacher_weights == method.recipe_teacher_weights
    # What the step computes follows the record: teacher contexts exactly for methods with a teacher,
    # the surrogate exactly for methods with a token advantage (unless distilling on sampled tokens).
    needs_teacher = objectives.uses_teacher_log_probs(algorithm) or objectives.uses_distillation(algorithm)
    assert needs_teacher == method.has_teacher
    assert objectives.uses_surrogate(algorithm) == (method.token_advantage != "none"
                                                    or algorithm.distill_loss == "sampled")
