"""`rlsd-train --help-config`: every field of the config tree with its type, default and meaning.

A field's meaning is its comment in config.py: the comment lines directly above it plus the
comment at the end of its line, read from the source with `tokenize`. So config.py stays plain
dataclasses that read like an annotated YAML file, each comment next to its field; the
alternative, `field(default=..., metadata={"help": "..."})`, would turn every one-line field
into a call with its text in a string. tests/test_config_help.py checks that every field has one.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

from rlsd_megatron.config import Config


@dataclass(frozen=True)
class FieldHelp:
    """One leaf of the config tree: `name` dotted ("rollout.n"), `type` as written in config.py,
    `default` as a JSON/YAML literal ("null", "8", "\"auto\""), `help` its comment (may be "")."""

    name: str
    type: str
    default: str
    help: str


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment text} for a dataclass defined in source: the run of comment
    lines right above the field and the comment on the field's own line(s), joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line number (1-based, in `source`) -> comment text
    own_line: set[int] = set()  # lines holding nothing but a comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            comments[row] = token.string.lstrip("#").strip()
            if not token.line[:col].strip():
                own_line.add(row)
    class_node = ast.parse(source).body[0]
    result = {}
    for node in class_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        row = node.lineno - 1
        while row in own_line:
            above.insert(0, comments[row])
            row -= 1
        trailing = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments]
        if above and trailing and above[-1].endswith("."):
            trailing[0] = trailing[0][:1].upper() + trailing[0][1:]  # a new sentence after the block
        result[node.target.id] = " ".join(above + trailing)
    return result


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def config_fields(cls: type = Config, prefix: str = "") -> list[FieldHelp]:
    """Every leaf field under `cls`, depth first in declaration order."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_fields(hints[f.name], f"{name}.")
        else:
            out.append(FieldHelp(name, str(f.type), json.dumps(_default(f)), comments.get(f.name, "")))
    return out


def format_config_help(width: int = 100) -> str:
    """The text `--help-config` prints: per section its docstring's first paragraph, then per field
    `name: type = default` and its comment, wrapped to `width`."""
    hints = typing.get_type_hints(Config)
    lines = ["Config fields: set them in the YAML file (section: {field: value}) or as dotted overrides",
             "on the command line, e.g. rollout.n=16. Defaults are shown as YAML/JSON literals."]
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        lines += [""] + textwrap.wrap(f"{section.name}: {summary}", width, subsequent_indent="    ")
        for item in config_fields(cls, f"{section.name}."):
            lines.append(f"  {item.name}: {item.type} = {item.default}")
            lines += textwrap.wrap(item.help, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines) + "\n"


class HelpConfigAction(argparse.Action):
    """`--help-config`: print `format_config_help()` and exit, like `--help`."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(format_config_help(), end="")
        parser.exit(0)
