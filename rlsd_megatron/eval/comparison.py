"""The paper-style comparison table: one row per method, one column per benchmark, plus the mean.

Pure: it takes the ``benchmarks`` mapping of ``rlsd-eval``'s ``summary.json`` (benchmark name →
metrics) for each run, grouped by method (one run per seed), and reports each benchmark's avg@n,
the mean over seeds with its standard error when there are several.
"""

from __future__ import annotations

import statistics
from typing import Mapping, Sequence

__all__ = ["comparison_table"]


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
