"""User reward functions, named by dotted path in ``reward.custom_fn``.

The function is ``package.module:function`` (importable from the trainer's ``sys.path``) with
the signature::

    def my_reward(response: str, ground_truth: str, **info) -> float | Mapping[str, float]

``response`` is the decoded rollout text, ``ground_truth`` the dataset answer; ``info`` holds
``question`` (raw problem text, or None) and ``response_length`` (tokens); only the keywords the
function declares are passed, so ``def my_reward(response, ground_truth)`` is fine. Return the
score, or a mapping with a ``"reward"`` entry plus any other numbers to log as components. The
soft overlong penalty (``reward.overlong_*``) is added on top; set ``reward.overlong_factor=0``
to turn it off. It runs in a verifier worker process under ``reward.timeout_s``: a timeout, an
exception, or a result that is not a finite number scores 0 and is counted, never stopping
training. Async functions are not supported.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Any, Callable, Mapping

__all__ = ["INFO_KEYS", "RewardFunctionError", "call_reward_fn", "load_reward_fn", "normalize_reward_output"]

INFO_KEYS = ("question", "response_length")
SIGNATURE = "def fn(response: str, ground_truth: str, **info) -> float | Mapping[str, float]"


class RewardFunctionError(ValueError):
    """``reward.custom_fn`` cannot be used: not importable, not callable, or a wrong signature."""


def load_reward_fn(path: str) -> Callable[..., Any]:
    """Import and check ``package.module:function``; raise :class:`RewardFunctionError` with the fix."""
    where = f"reward.custom_fn={path!r}"
    module_name, colon, attr = path.partition(":")
    if not colon or not module_name or not attr:
        raise RewardFunctionError(f"{where} must look like 'package.module:function' (a colon before the "
                                  "function name), e.g. 'my_rewards.code:score'.")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module's own code raised
        raise RewardFunctionError(f"{where}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
                                  "is its directory on PYTHONPATH (or the package installed)?") from exc
    fn: Any = module
    for name in attr.split("."):
        if not hasattr(fn, name):
            raise RewardFunctionError(f"{where}: {module_name!r} has no attribute {attr!r}; "
                                      f"names it defines include {_public_names(module)}.")
        fn = getattr(fn, name)
    if not callable(fn):
        raise RewardFunctionError(f"{where} is a {type(fn).__name__}, not a function; it must be {SIGNATURE}.")
    if inspect.iscoroutinefunction(fn):
        raise RewardFunctionError(f"{where} is an async function; pass a plain function: {SIGNATURE}.")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # a builtin without an introspectable signature: let the first call tell
    try:
        signature.bind("response", "ground_truth", **_accepted_info(fn, dict.fromkeys(INFO_KEYS)))
    except TypeError as exc:
        raise RewardFunctionError(f"{where} has signature {signature}, which cannot be called as "
                                  f"fn(response, ground_truth) ({exc}); it must be {SIGNATURE}.") from exc
    return fn


def _public_names(module: Any) -> list[str]:
    return sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:20]


def _accepted_info(fn: Callable[..., Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``info`` that ``fn`` declares as keywords (all of them with ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(info)
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in info.items() if k in names}


def normalize_reward_output(value: Any) -> dict[str, float]:
    """``{"reward": r, **components}`` from a reward function's result; ValueError if malformed."""
    if isinstance(value, Mapping):
        if "reward" not in value:
            raise ValueError(f"returned a mapping without a 'reward' key (keys: {sorted(value)[:10]}).")
        items = dict(value)
    else:
        items = {"reward": value}
    out = {}
    for key, number in items.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"returned {key}={number!r}; rewards must be finite numbers.")
        out[str(key)] = float(number)
    return out


@functools.cache
def _cached_fn(path: str) -> Callable[..., Any]:
    return load_reward_fn(path)


def call_reward_fn(path: str, response: str, ground_truth: str, info: dict[str, Any]) -> dict[str, float]:
    """Worker-side entry point: call the user function once and normalise its result."""
    fn = _cached_fn(path)
    return normalize_reward_output(fn(response, ground_truth, **_accepted_info(fn, info)))
