"""Every field of the config tree is read by the code that runs: a field that only config.py, the
config checks and the memory planner look at is a feature that does not exist (issue 15: OPD's
`teacher_model` was checked for presence and then never read).

How a read is recognised (static, over the ASTs of rlsd_megatron/ and tools/): an attribute load
`x.field` whose receiver `x` is known to be that field's section. Receivers are typed by a small
flow-insensitive inference:
- a parameter annotated with a config class (`cfg: Config`, `rollout: RolloutConfig | None`),
- `<Config>.<section>` (`cfg.algorithm`, `self.cfg.data`),
- a local name assigned one of those (`a = cfg.algorithm`, `a, problems = cfg.algorithm, []`),
  visible in nested functions and lambdas too,
- `self.<attr>` assigned one of those in any method of the class,
- a call of a package function whose return annotation is a config class (`load_config(...)`),
- `getattr(x, "field")` with a constant name.

What it catches: a field that no typed receiver reads outside config.py, the `*_problems` /
`validate_config` checks in config_checks/ (its resolvers, like `resolve_transformer_impl`,
are readers) and the planner, plan.py with model_params.py (a field only the planner counts, as OPD's teacher could have been, is
no feature either; the few fields whose job is a check or the plan are listed, with why). An
attribute of the same name on an unrelated object (`args.lr`, `hf.vocab_size`) does not count, so
the next `teacher_model` cannot hide behind one.
What it cannot catch: a field that is read but then ignored (read into a name nothing uses, or
only in dead code or a function nothing calls). A read through an unannotated alias or through
`dataclasses.asdict` splatting is missed, which makes this test fail (a false alarm: annotate the
parameter).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlsd_megatron"
CONFIG = PACKAGE / "config.py"
CHECKS = PACKAGE / "config_checks"  # a package: every module holds checks
PLANNER = {PACKAGE / "plan.py", PACKAGE / "model_params.py"}  # the memory planner and the parameter counts it reads
# Fields whose documented job is done before the run, by a config check or the planner; each must be
# read there (checked below) and nowhere at run time (else the entry is stale).
CHECKED_OR_PLANNED = {
    "ParallelConfig.dp": "an assertion on the launch: layout_problems compares it with world size / (tp·pp·cp)",
    "TrainConfig.max_seq_length": "the planner's sequence length for activation memory (and the CP divisibility "
                                  "check); nothing at run time holds sequences to it",
}
# Fields whose reader is another engineer's work on issue 15, not yet merged here. The test also fails
# when one of these is read, so the entry is removed when the reader lands.
NOT_YET_READ: dict[str, str] = {}  # field -> the work that will read it (none today)


def config_classes() -> tuple[dict[str, set[str]], dict[str, str]]:
    """({class name: its field names}, {Config field name: its section class}) from config.py."""
    fields: dict[str, set[str]] = {}
    annotations: dict[str, dict[str, str]] = {}
    for node in ast.parse(CONFIG.read_text()).body:
        if isinstance(node, ast.ClassDef):
            assigns = [n for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
            if assigns:
                fields[node.name] = {n.target.id for n in assigns}
                annotations[node.name] = {n.target.id: ast.unparse(n.annotation) for n in assigns}
    sections = {name: ann for name, ann in annotations["Config"].items() if ann in fields}
    return fields, sections


FIELDS, SECTIONS = config_classes()


def annotation_class(node: ast.expr | None) -> str | None:
    """The config class an annotation names (`Config`, `"Config"`, `X | None`, `Optional[X]`)."""
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return None
    if isinstance(node, ast.Name) and node.id in FIELDS:
        return node.id
    if isinstance(node, ast.Attribute) and node.attr in FIELDS:  # config.Config
        return node.attr
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return annotation_class(node.left) or annotation_class(node.right)
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("Optional", "typing.Optional"):
        return annotation_class(node.slice)
    return None


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "tools").rglob("*.py"))


def returning_config() -> dict[str, str]:
    """Package functions whose return annotation is a config class, by name."""
    found = {}
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and annotation_class(node.returns):
                found[node.name] = annotation_class(node.returns)
    return found


RETURNS = returning_config()
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


class ReadFinder:
    """Config field reads in one module; `skip(function_name)` excludes check functions."""

    def __init__(self, tree: ast.Module, skip=lambda name: False):
        self.tree, self.skip = tree, skip
        self.reads: set[str] = set()
        self.self_attrs: dict[str, dict[str, str]] = {}  # class name → {attribute: config class}

    def run(self) -> set[str]:
        for recording in (False, True):  # first pass: learn self.<attr> types; second: record reads
            self.recording = recording
            self.visit_scope(self.tree, {}, None)
        return self.reads

    def type_of(self, node: ast.expr, env: dict[str, str], cls: str | None) -> str | None:
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and cls is not None:
                return self.self_attrs.get(cls, {}).get(node.attr)
            if self.type_of(node.value, env, cls) == "Config":
                return SECTIONS.get(node.attr)
            return None
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            return RETURNS.get(name)
        return None

    def bind(self, target: ast.expr, value: ast.expr, env: dict[str, str], cls: str | None) -> None:
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)):
            for t, v in zip(target.elts, value.elts):
                self.bind(t, v, env, cls)
            return
        kind = self.type_of(value, env, cls)
        if kind is None:
            return
        if isinstance(target, ast.Name):
            env[target.id] = kind
        elif (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
              and cls is not None):
            self.self_attrs.setdefault(cls, {})[target.attr] = kind

    def visit_scope(self, scope: ast.AST, outer: dict[str, str], cls: str | None) -> None:
        """Type the names of one function (or the module), then record its reads; nested
        functions see this scope's names, classes set `cls` for `self`."""
        env = dict(outer)
        if isinstance(scope, FUNCTIONS):
            args = scope.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                kind = annotation_class(arg.annotation)
                if kind:
                    env[arg.arg] = kind
                else:
                    env.pop(arg.arg, None)  # a parameter shadows an outer name
        body = scope.body if isinstance(scope.body, list) else [scope.body]
        own = list(self.own_nodes(body))
        for _ in range(2):  # assignments in any order (flow-insensitive)
            for node in own:
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        self.bind(target, node.value, env, cls)
                elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
                    kind = annotation_class(node.annotation) if isinstance(node, ast.AnnAssign) else None
                    if kind and isinstance(node.target, ast.Name):
                        env[node.target.id] = kind
                    else:
                        self.bind(node.target, node.value, env, cls)
        for node in own:
            if isinstance(node, FUNCTIONS):
                if not self.skip(getattr(node, "name", "")):
                    self.visit_scope(node, env, cls)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        kind = annotation_class(item.annotation)
                        if kind:
                            self.self_attrs.setdefault(node.name, {})[item.target.id] = kind
                    if isinstance(item, FUNCTIONS) and not self.skip(item.name):
                        self.visit_scope(item, env, node.name)
            elif self.recording:
                self.record(node, env, cls)

    @staticmethod
    def own_nodes(body: list[ast.AST]):
        """The nodes of a scope, not descending into nested functions and classes (yielded, not entered)."""
        stack = list(reversed(body))
        while stack:
            node = stack.pop()
            yield node
            if not isinstance(node, (*FUNCTIONS, ast.ClassDef)):
                stack.extend(reversed(list(ast.iter_child_nodes(node))))

    def record(self, node: ast.AST, env: dict[str, str], cls: str | None) -> None:
        """Note `node` if it reads a field of a section (reading a section itself is no use of it)."""
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            kind = self.type_of(node.value, env, cls)
            if kind in FIELDS and kind != "Config" and node.attr in FIELDS[kind]:
                self.reads.add(f"{kind}.{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            kind = self.type_of(node.args[0], env, cls)
            if kind in FIELDS and kind != "Config" and node.args[1].value in FIELDS[kind]:
                self.reads.add(f"{kind}.{node.args[1].value}")


def is_check(name: str) -> bool:
    return name.endswith("_problems") or name == "validate_config"


def fields_read(*, at_run_time: bool) -> set[str]:
    """Fields read at run time (everywhere but config.py, the config checks and the planner), or
    (`at_run_time=False`) by the config checks and the planner."""
    reads: set[str] = set()
    for path in package_files():
        if path == CONFIG or (path in PLANNER and at_run_time):
            continue
        if CHECKS in path.parents:
            skip = is_check if at_run_time else (lambda name: not is_check(name))
        elif at_run_time or path in PLANNER:
            skip = lambda name: False  # noqa: E731
        else:
            continue
        reads |= ReadFinder(ast.parse(path.read_text()), skip).run()
    return reads


def all_fields() -> set[str]:
    return {f"{cls}.{name}" for cls, names in FIELDS.items() if cls != "Config" for name in names}


def test_every_config_field_is_read_at_run_time():
    run_time = fields_read(at_run_time=True)
    unread = all_fields() - run_time
    unexpected = sorted(unread - set(NOT_YET_READ) - set(CHECKED_OR_PLANNED))
    assert not unexpected, (
        f"config fields that no code outside config.py, the config checks and the planner reads: {unexpected}. "
        "A field nothing reads is a feature that does not exist: read it where it takes effect, or remove it "
        "(if it is read through an untyped name, annotate that parameter with its config class).")
    stale = sorted((set(NOT_YET_READ) | set(CHECKED_OR_PLANNED)) & run_time)
    assert not stale, f"{stale} are read at run time now: remove them from NOT_YET_READ / CHECKED_OR_PLANNED"
    before_the_run = fields_read(at_run_time=False)
    assert set(CHECKED_OR_PLANNED) <= before_the_run, sorted(set(CHECKED_OR_PLANNED) - before_the_run)


def finder_reads(source: str, skip=lambda name: False) -> set[str]:
    return ReadFinder(ast.parse(source), skip).run()


def test_the_finder_follows_typed_receivers_only():
    source = '''
from rlsd_megatron.config import AlgorithmConfig, Config, load_config

def typed(cfg: Config, rollout: "RolloutConfig | None"):
    a, extra = cfg.algorithm, 1
    helper = lambda: a.lam0
    rollout.top_k
    getattr(cfg.data, "shuffle")
    cfg.train.steps = 3          # a write is not a read

def untyped(cfg, args):
    cfg.algorithm.lam_decay_steps  # no annotation: unknown receiver
    args.weight_clip_eps           # same name, unrelated object

class Holder:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model = cfg.model
    def use(self):
        return self.cfg.optimizer.lr + self.model.hidden_size + load_config().logging.log_interval

def alg_problems(cfg: Config):
    return cfg.algorithm.clip_low
'''
    assert finder_reads(source, skip=is_check) == {
        "AlgorithmConfig.lam0", "RolloutConfig.top_k", "DataConfig.shuffle", "OptimizerConfig.lr",
        "ModelConfig.hidden_size", "LoggingConfig.log_interval"}
    assert "AlgorithmConfig.clip_low" in finder_reads(source)  # only skipped as a check function
