"""The paper-style comparison table: one row per method, one column per benchmark, plus the mean.

`comparison_table` is pure: it takes the ``benchmarks`` mapping of ``rlsd-eval``'s ``summary.json``
(benchmark name → metrics) for each run, grouped by method (one run per seed), and reports each
benchmark's avg@n, the mean over seeds with its standard error when there are several. From the
shell, on ``rlsd-eval --out`` directories (a method named again adds a seed to its row)::

    python -m rlsd_megatron.eval.comparison base=runs/eval_base rlsd=runs/eval_rlsd_s1 rlsd=runs/eval_rlsd_s2 \
        grpo=runs/eval_grpo_s1 --out runs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["comparison_table", "main"]


def _avg_at_n(metrics: Mapping[str, float]) -> tuple[str, float]:
    (key,) = [k for k in metrics if k.startswith("avg@")]
    return key, metrics[key]


def _cell(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values) / len(values) ** 0.5:.3f}"


def comparison_table(runs: Mapping[str, Sequence[Mapping[str, Mapping[str, float]]]]) -> str:
    """Markdown: a row per method of ``runs`` (method → one summary per seed, each benchmark →
    metrics), a column per benchmark (avg@n, mean ± standard error over seeds) and ``mean`` (each
    seed's mean over benchmarks, then over seeds). Every run must hold the same benchmarks."""
    if not runs or not all(runs.values()):
        raise ValueError("comparison_table needs at least one run per method.")
    names = list(next(iter(runs.values()))[0])
    header = {name: _avg_at_n(next(iter(runs.values()))[0][name])[0] for name in names}
    lines = ["| method | " + " | ".join(f"{name} {header[name]}" for name in names) + " | mean |",
             "|---|" + "---:|" * (len(names) + 1)]
    for method, summaries in runs.items():
        for i, summary in enumerate(summaries):
            if list(summary) != names:
                raise ValueError(f"run {i + 1} of {method!r} has benchmarks {list(summary)}, the table's are {names}; "
                                 "evaluate every run on the same benchmark file.")
        columns = [[_avg_at_n(summary[name])[1] for summary in summaries] for name in names]
        means = [statistics.fmean(_avg_at_n(summary[name])[1] for name in names) for summary in summaries]
        lines.append(f"| {method} | " + " | ".join(_cell(c) for c in columns) + f" | {_cell(means)} |")
    return "\n".join(lines) + "\n"


def read_runs(pairs: Sequence[str]) -> dict[str, list[dict]]:
    """``METHOD=EVAL_DIR`` pairs → method → the ``benchmarks`` of each directory's summary.json, in order."""
    runs: dict[str, list[dict]] = {}
    for pair in pairs:
        method, sep, directory = pair.partition("=")
        if not sep or not method or not directory:
            raise ValueError(f"{pair!r}: give METHOD=EVAL_DIR (an rlsd-eval --out directory)")
        summary = Path(directory) / "summary.json"
        if not summary.is_file():
            raise ValueError(f"{summary} does not exist: has rlsd-eval finished on {directory}?")
        runs.setdefault(method, []).append(json.loads(summary.read_text())["benchmarks"])
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlsd_megatron.eval.comparison",
                                     description="The comparison table (markdown) of rlsd-eval results, a row per method.")
    parser.add_argument("runs", nargs="+", metavar="METHOD=EVAL_DIR",
                        help="an rlsd-eval --out directory and its method; repeat a method for its seeds")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        table = comparison_table(read_runs(args.runs))
    except ValueError as exc:
        print(f"comparison: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
