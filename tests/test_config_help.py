"""`rlsd-train --help-config`: every config field has its comment, printed with its type and default."""

import contextlib
import dataclasses
import io

import pytest

from rlsd_megatron import train
from rlsd_megatron.config import Config
from rlsd_megatron.config_help import config_fields, field_comments


def _leaf_names(cls=Config, prefix=""):
    """Dotted names of the leaves, walked independently of config_help."""
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaf_names(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_field_has_help_text():
    fields = config_fields()
    assert [f.name for f in fields] == list(_leaf_names())
    missing = [f.name for f in fields if len(f.help.split()) < 2]
    assert not missing, f"config fields without a comment in config.py: {missing}"


def test_comments_are_read_from_above_and_from_the_line():
    @dataclasses.dataclass
    class Sample:
        # first line above
        # second line above
        a: int = 1  # a's own
        b: str = "#not a comment"
        c: int = 2

        # a blank line ends the block
        d: int = 3

    assert field_comments(Sample) == {"a": "first line above second line above a's own", "b": "", "c": "",
                                      "d": "a blank line ends the block"}


def test_help_config_prints_a_field_with_its_default_and_comment():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        train.main(["--help-config"])  # no --config needed, as with --help
    assert exit_info.value.code == 0
    lines = out.getvalue().splitlines()
    at = lines.index("  rollout.n: int = 8")
    assert lines[at + 1].strip() == "G: rollouts per prompt (recipe 8)"
    teacher = "  algorithm.teacher_weights: Literal['live', 'frozen', 'frozen_sync', 'ema', 'separate'] = \"live\""
    assert teacher in lines
    assert any(line.startswith("rollout: Generation.") for line in lines)
