"""Benchmark metrics from per-sample scores: avg@n, pass@k, maj@n, response length, truncation.

Pure functions over plain Python values (no torch, no I/O), so a result file can be re-scored
and checked by hand. One benchmark is a list of :class:`ProblemSamples`, one per problem, every
problem with the same number n of samples (the benchmark's ``n``).

- **avg@n**: the mean score over all n·P samples (the paper's "accuracy averaged over samples").
- **pass@k** (k ≤ n): the probability that at least one of k samples drawn without replacement
  from a problem's n is correct, averaged over problems, by the unbiased estimator of Chen et al.
  2021 ("Evaluating Large Language Models Trained on Code", §2.1):
  ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so no binomial
  coefficient (which overflows a float for n in the hundreds) is ever formed.
- **maj@n**: the share of problems whose most frequent extracted answer is correct. Samples
  without an extracted answer (``None``) do not vote; a problem where nobody answered scores 0.
  A tie between answers is broken by the answer given first (lowest sample index): deterministic,
  independent of hashing, and the same rule on any re-computation from the result file.
- **mean response tokens** and **truncation rate** (share of samples cut at the token limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["ProblemSamples", "benchmark_metrics", "majority_answer", "pass_at_k"]


@dataclass(frozen=True)
class ProblemSamples:
    """The n samples of one problem: ``scores`` (0.0 or 1.0 each), ``answers`` (the extracted
    answer of each, None when none was found), ``lengths`` (response tokens), ``truncated``
    (True when the sample hit the token limit). All four have length n."""

    scores: Sequence[float]
    answers: Sequence[str | None]
    lengths: Sequence[int]
    truncated: Sequence[bool]

    def __post_init__(self):
        sizes = {len(self.scores), len(self.answers), len(self.lengths), len(self.truncated)}
        if len(sizes) != 1 or not self.scores:
            raise ValueError(f"a problem's scores / answers / lengths / truncated must have one common length n >= 1; "
                             f"got {len(self.scores)} / {len(self.answers)} / {len(self.lengths)} / "
                             f"{len(self.truncated)}.")
        bad = [s for s in self.scores if s not in (0.0, 1.0)]
        if bad:
            raise ValueError(f"scores must be 0.0 or 1.0 (pass@k and maj@n count correct samples); got {bad[:3]}.")

    @property
    def correct(self) -> int:
        return int(sum(self.scores))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct samples out of ``n`` (see the module
    docstring): ``1 - C(n-c, k) / C(n, k)``, 1.0 when fewer than k samples are wrong."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    survive = 1.0  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    for i in range(n - c + 1, n + 1):
        survive *= 1.0 - k / i
    return 1.0 - survive


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample giving the most frequent non-None answer (ties: the answer seen
    first wins), or None when no sample has an answer."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, i)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[a] for a, c in counts.items() if c == best)


def benchmark_metrics(problems: Sequence[ProblemSamples], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """The metrics of one benchmark: ``avg@n``, ``pass@k`` for each k in ``ks``, ``maj@n``,
    ``mean_response_tokens``, ``truncation_rate``, and the counts ``problems`` and ``samples``.

    Keys carry the numbers (``avg@8``, ``pass@4``, ``maj@8``). Every problem must have the same n
    and every k must be between 1 and n. The maj@n vote's winner is scored by its first sample's
    score (samples with the same extracted answer are graded alike by every answer type).
    """
    if not problems:
        raise ValueError("benchmark_metrics needs at least one problem.")
    sizes = sorted({len(p.scores) for p in problems})
    if len(sizes) != 1:
        raise ValueError(f"every problem of a benchmark needs the same number of samples n; found n in {sizes}.")
    n = sizes[0]
    bad_k = [k for k in ks if not 1 <= k <= n]
    if bad_k:
        raise ValueError(f"pass@k needs 1 <= k <= n={n}; got k={bad_k} (lower k or sample more).")
    total = n * len(problems)
    metrics = {f"avg@{n}": sum(p.correct for p in problems) / total}
    for k in sorted(set(ks)):
        metrics[f"pass@{k}"] = sum(pass_at_k(n, p.correct, k) for p in problems) / len(problems)
    winners = [majority_answer(p.answers) for p in problems]
    metrics[f"maj@{n}"] = sum(p.scores[w] for p, w in zip(problems, winners) if w is not None) / len(problems)
    metrics["mean_response_tokens"] = sum(sum(p.lengths) for p in problems) / total
    metrics["truncation_rate"] = sum(sum(map(bool, p.truncated)) for p in problems) / total
    metrics["problems"] = len(problems)
    metrics["samples"] = total
    return metrics
