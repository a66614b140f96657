"""The planner's figures quoted in the SLURM scripts' headers are what the planner says today.

Each `#   $ python -m rlsd_megatron.plan ARGS` block of a script (continued with `\\`) is run
in-process; every line quoted under it must be a line of the planner's output (a block may
quote a subset of the table's rows), so a header cannot keep figures of an older planner or preset.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rlsd_megatron.plan import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "slurm").glob("rlsd_*.sh"))


def quoted_plans(script: Path) -> list[tuple[list[str], list[str]]]:
    """(planner arguments, quoted output lines) of each block in `script`'s header."""
    comments = [line[4:] for line in script.read_text().splitlines() if line.startswith("#   ")]
    blocks, i = [], 0
    while i < len(comments):
        if not comments[i].startswith("$ python -m rlsd_megatron.plan "):
            i += 1
            continue
        command = comments[i][len("$ python -m rlsd_megatron.plan "):]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + comments[i].strip()
        i += 1
        quoted = []
        while i < len(comments) and not comments[i].startswith("$ "):
            quoted.append(comments[i])
            i += 1
        blocks.append((shlex.split(command), quoted))
    return blocks


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_quoted_planner_output_is_current(script, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = quoted_plans(script)
    assert blocks, f"{script.name} quotes no planner output"
    for args, quoted in blocks:
        main(args)
        captured = capsys.readouterr()
        actual = {re.sub(r"^rlsd-plan: error: ", "", line) for line in (captured.out + captured.err).splitlines()}
        stale = [line for line in quoted if re.sub(r"^rlsd-plan: error: ", "", line) not in actual]
        assert not stale, f"{script.name}: `rlsd-plan {' '.join(args)}` no longer prints {stale}"
