"""Benchmark evaluation (``rlsd-eval``, ``train.eval_sets``, the method comparison table).

- ``metrics``: avg@n, pass@k (unbiased estimator), maj@n, response length, truncation rate.
- ``answers``: multiple choice, numeric with tolerance, exact string; ``grading`` adds math
  through the sandboxed math-verify pool.
- ``benchmarks``: the per-benchmark settings (YAML list) and benchmark rows.
- ``model_source``: a Megatron checkpoint (any TP/PP) or HF directory → engine and prompt format.
- ``runner``: generation, grading and resumable per-benchmark result files; ``cli`` the command.
- ``in_training``: the same benchmarks on the trainer's engines; ``comparison``: the paper table;
  ``addition_benchmarks``: the built-in task's benchmark files.

Submodules are imported where used: metrics, answers and comparison need neither torch nor
megatron-core.
"""
