"""RLSD's step time against GRPO's on the CPU demo, with and without `train.student_log_probs_in_update`,
measured in one run.

    .venv/bin/python benchmarks/rlsd_overhead.py                # 2 rounds x 4 variants x 20 steps, ~6 min on 2 cores
    .venv/bin/python benchmarks/rlsd_overhead.py --rounds 3 --steps 30

Each variant is the README's demo command (`examples/configs/cpu_demo.yaml`: 2 gloo processes,
the embedded engine, RLSD with the live teacher) from scratch (no warm start); the variants run
in turn, `--rounds` times, so that a change in the machine's load falls on all of them: GRPO and
RLSD as today (the score phase runs the student's forward, and for RLSD the teacher's), then
both with the student's log-probs taken from the update's own forward. The figure per variant
is the median over steps 6..N (the first steps warm caches) of all its rounds of
`perf/step_seconds` and `perf/score_seconds`, read from the runs' tensorboard events. Printed:
the medians, RLSD / GRPO before (both without the switch), RLSD with it / GRPO without (the
overhead the issue counts: goal <= 1.15x) and with it on both sides.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "grpo": ["algorithm.method=grpo"],
    "rlsd": ["algorithm.method=rlsd"],
    "grpo+in_update": ["algorithm.method=grpo", "train.student_log_probs_in_update=true"],
    "rlsd+in_update": ["algorithm.method=rlsd", "train.student_log_probs_in_update=true"],
}


def run_variant(name: str, overrides: list[str], steps: int, log_dir: Path) -> dict[str, list[float]]:
    """Run the demo for `steps` RL steps with `overrides`; per-step perf scalars by name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "-m", "rlsd_megatron.train",
               "--config", "examples/configs/cpu_demo.yaml", *overrides, "warm_start.max_steps=0",
               f"train.steps={steps}", "train.eval_interval=0", f"logging.dir={log_dir}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]
            for tag in ("perf/step_seconds", "perf/score_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the medians")
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error(f"--steps={args.steps} leaves nothing after the first --skip={args.skip} steps")
    pooled: dict[str, dict[str, list[float]]] = {name: {} for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, overrides in VARIANTS.items():
                series = run_variant(name, overrides, args.steps, Path(tmp) / f"{name}-{round_}")
                for tag, values in series.items():
                    pooled[name].setdefault(tag, []).extend(values[args.skip:])
    medians = {name: {tag: statistics.median(values) for tag, values in series.items()}
               for name, series in pooled.items()}
    for name, m in medians.items():
        print(f"{name:16s} step {m['perf/step_seconds']:.3f} s  score {m['perf/score_seconds']:.3f} s  (medians of "
              f"steps {args.skip + 1}..{args.steps} of {args.rounds} rounds)")
    step = {name: m["perf/step_seconds"] for name, m in medians.items()}
    print(f"RLSD / GRPO before: {step['rlsd'] / step['grpo']:.2f}x")
    print(f"RLSD with student_log_probs_in_update / GRPO as today: {step['rlsd+in_update'] / step['grpo']:.2f}x "
          "(goal <= 1.15x)")
    print(f"both with student_log_probs_in_update: {step['rlsd+in_update'] / step['grpo+in_update']:.2f}x")


if __name__ == "__main__":
    main()
