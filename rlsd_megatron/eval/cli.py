"""``rlsd-eval`` / ``python -m rlsd_megatron.eval``: evaluate a checkpoint on benchmark files.

    rlsd-eval --model runs/cpu_demo/ckpt --benchmarks examples/benchmarks/reversed_addition.yaml --out runs/eval

Writes ``<out>/<benchmark>.json`` (settings, metrics, every sample), ``<out>/summary.json`` and
``<out>/results.md``, and prints the table. Rerunning with the same ``--out`` skips finished
benchmarks (see ``eval.runner``). Input problems (a missing file, a bad row, unknown settings)
are reported as ``rlsd-eval: error: …`` with exit status 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlsd_megatron.checkpoint.directory import CheckpointError
from rlsd_megatron.data.readers import DataError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsd-eval", description="Evaluate a checkpoint on benchmark files.")
    p.add_argument("--model", required=True, help="Megatron checkpoint (root or iteration directory, any TP/PP) "
                                                  "or HF directory")
    p.add_argument("--benchmarks", required=True, help="YAML list of benchmarks (eval/benchmarks.py)")
    p.add_argument("--out", required=True, help="output directory (reused: finished benchmarks are not redone)")
    p.add_argument("--backend", default="auto", choices=["auto", "embedded", "sglang"],
                   help="auto: sglang when CUDA is available, else the embedded CPU engine")
    p.add_argument("--engines", type=int, default=1, help="data-parallel engines (sglang: engine k on GPUs "
                                                          "k*engine_tp ...)")
    p.add_argument("--engine-tp", type=int, default=1, help="tensor parallelism of each SGLang engine")
    p.add_argument("--mem-fraction", type=float, default=0.8, help="sglang: share of GPU memory for weights + KV cache")
    p.add_argument("--deterministic", action="store_true", help="sglang: deterministic inference, so the per-sample "
                                                                "seeds hold (slower; the embedded engine always is)")
    p.add_argument("--tokenizer", default=None, help="chat tokenizer directory (default: the checkpoint's)")
    p.add_argument("--chunk-prompts", type=int, default=64, help="problems per generate call (SGLang batches "
                                                                            "internally: raise it there)")
    p.add_argument("--verifier-workers", type=int, default=None, help="math-verify processes (default min(4, cpus))")
    p.add_argument("--verifier-timeout", type=float, default=10.0, help="seconds per math answer")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, evaluate, print the markdown table; returns the exit status."""
    from rlsd_megatron.eval.benchmarks import load_benchmark_specs
    from rlsd_megatron.eval.grading import ResponseGrader
    from rlsd_megatron.eval.model_source import build_engine, build_prompter, open_model
    from rlsd_megatron.eval.runner import ResultMismatch, markdown_table, run_benchmarks
    from rlsd_megatron.logging.quiet import quiet_known_noise
    from rlsd_megatron.rollout.provider import resolve_backend

    args = _parser().parse_args(argv)
    quiet_known_noise()
    try:
        if min(args.engines, args.engine_tp, args.chunk_prompts) < 1:
            raise ValueError(f"--engines {args.engines}, --engine-tp {args.engine_tp} and --chunk-prompts "
                             f"{args.chunk_prompts} must be >= 1.")
        specs = load_benchmark_specs(args.benchmarks)
        model = open_model(args.model, tokenizer_dir=args.tokenizer)
        backend = resolve_backend(args.backend)
        prompters = {}

        def make_prompter(spec):
            if spec.system_prompt not in prompters:
                prompters[spec.system_prompt] = build_prompter(model, system_prompt=spec.system_prompt)
            return prompters[spec.system_prompt]

        make_prompter(specs[0])  # a missing tokenizer fails now, not after the engine started
        with ResponseGrader(num_workers=args.verifier_workers, timeout_s=args.verifier_timeout) as grader:
            summary = run_benchmarks(
                specs, args.out, model_id=str(model.path), grader=grader, make_prompter=make_prompter,
                make_engine=lambda: build_engine(model, backend, engines=args.engines, engine_tp=args.engine_tp,
                                                 work_dir=Path(args.out), mem_fraction_static=args.mem_fraction,
                                                 deterministic=args.deterministic),
                chunk_prompts=args.chunk_prompts, progress=not args.no_progress)
            if grader.timeouts or grader.errors:
                print(f"warning: {grader.timeouts} math answer(s) timed out and {grader.errors} failed in the "
                      f"verifier; each scored 0", file=sys.stderr)
    except (ValueError, DataError, CheckpointError, ResultMismatch, FileNotFoundError) as exc:
        print(f"rlsd-eval: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(summary), end="")
    return 0
