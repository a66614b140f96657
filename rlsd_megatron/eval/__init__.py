"""Benchmark evaluation (``rlsd-eval``): metrics, answer types, benchmark files and the runner.

- ``metrics``: avg@n, pass@k (unbiased estimator), maj@n, response length, truncation rate.
- ``answers``: graders by answer type (multiple choice, numeric, exact string, math).

Submodules are imported where used: the metrics and graders need neither torch nor megatron-core.
"""
