"""Benchmark files for the built-in reversed-addition task (the CPU demo's), so the whole
``rlsd-eval`` path runs on CPU: ``python -m rlsd_megatron.eval.addition_benchmarks --out DIR``
writes them; ``examples/benchmarks/reversed_addition/`` holds the committed copies.

Three sets of 64 problems, in the task's format (``data.reversed_addition``: operands and sum
least-significant digit first, the sum zero-padded to one digit more than the operands):

- ``heldout_3digit``: 3-digit problems drawn with their own seed. The trainer draws from all 10⁶
  operand pairs, so "held out" means "not chosen for training or for the validation set on
  purpose"; a 300-step demo run sees ~5,000 of the 10⁶ pairs.
- ``carry_3digit``: 3-digit problems whose carry runs through every digit into the fourth
  (units sum ≥ 10, tens and hundreds sums ≥ 9). Hard for a human, not for the demo's models:
  the README's OPD teacher scored 0.66 avg@8 here against 0.54 on ``heldout_3digit``.
- ``four_digit``: 4-digit operands, a 5-digit answer: a size the demo never trains on.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

__all__ = ["BENCHMARK_SETS", "addition_row", "benchmark_rows", "write_benchmark_files"]

BENCHMARK_SETS = ("heldout_3digit", "carry_3digit", "four_digit")
_PROBLEMS = 64
_SEED = 20_261_204  # not the validation set's seed (10**6)


def addition_row(a: int, b: int, digits: int) -> dict[str, str]:
    """The task's ``question`` / ``answer`` for ``a + b`` with ``digits``-digit operands."""
    return {"question": f"{a:0{digits}d}"[::-1] + "+" + f"{b:0{digits}d}"[::-1],
            "answer": f"{a + b:0{digits + 1}d}"[::-1]}


def _full_carry(rng: random.Random) -> tuple[int, int]:
    a_digits, b_digits = [], []
    for position in range(3):
        low = 10 if position == 0 else 9  # a carry out of every position
        while True:
            x, y = rng.randrange(10), rng.randrange(10)
            if x + y >= low:
                break
        a_digits.append(x)
        b_digits.append(y)
    return (sum(d * 10**i for i, d in enumerate(a_digits)), sum(d * 10**i for i, d in enumerate(b_digits)))


def benchmark_rows(name: str) -> list[dict[str, str]]:
    """The rows of one set of :data:`BENCHMARK_SETS` (deterministic)."""
    rng = random.Random(f"{_SEED}:{name}")
    if name == "heldout_3digit":
        pairs = [(rng.randrange(1000), rng.randrange(1000)) for _ in range(_PROBLEMS)]
    elif name == "carry_3digit":
        pairs = [_full_carry(rng) for _ in range(_PROBLEMS)]
    elif name == "four_digit":
        pairs = [(rng.randrange(1000, 10_000), rng.randrange(1000, 10_000)) for _ in range(_PROBLEMS)]
    else:
        raise ValueError(f"unknown benchmark set {name!r}; known: {list(BENCHMARK_SETS)}.")
    return [addition_row(a, b, 4 if name == "four_digit" else 3) for a, b in pairs]


def write_benchmark_files(out: str | Path) -> list[Path]:
    """Write ``<out>/<set>.jsonl`` for every set; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in BENCHMARK_SETS:
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in benchmark_rows(name)))
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the reversed-addition benchmark files.")
    parser.add_argument("--out", default="examples/benchmarks/reversed_addition")
    for written in write_benchmark_files(parser.parse_args().out):
        print(written)
