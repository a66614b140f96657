"""Compare RL methods on the built-in CPU task: same seeds, same warm start, same budget.

    .venv/bin/python examples/compare_methods.py --seeds 1 2 3 --methods rlsd grpo opsd --steps 300

For each seed: one supervised warm start (saved once, `warm_start.output`), then one RL run per
method from those weights (`checkpoint.init_from`), each `torchrun --nproc-per-node 2 -m
rlsd_megatron.train --config examples/configs/cpu_demo.yaml`. Reads `val/reward` from the
tensorboard logs, writes `<out>/val_reward.png` (mean ± standard error over seeds per method)
and prints, per method, the steps each seed needed to reach each threshold and the mean reward
over the run. Each run's final checkpoint is evaluated by `rlsd-eval` on `--benchmarks` (default
the built-in reversed-addition files) and the paper-style table — a row per method, a column per
benchmark (avg@n, mean ± s.e. over seeds) and the mean — is printed and written to
`<out>/benchmarks.md`. Runs finished by an earlier invocation (same --out, --steps) are reused. The RLSD paper reports RLSD reaching GRPO's accuracy in about half the steps on
8B vision-language models; this task is a 0.6M-parameter model trained from scratch, where
shared/notes/cpu-demo.md measured no difference — the script reports what it measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

METHOD_OVERRIDES = {
    "rlsd": ["algorithm.method=rlsd"],
    "grpo": ["algorithm.method=grpo"],
    "opsd": ["algorithm.method=opsd", "algorithm.teacher_weights=frozen", "algorithm.distill_loss=jsd"],
    "sdpo": ["algorithm.method=sdpo", "algorithm.teacher_weights=ema", "algorithm.distill_loss=topk",
             "algorithm.distill_topk=16", "algorithm.distill_support=student"],
    "dapo": ["algorithm.method=dapo", "algorithm.dynamic_sampling=true", "algorithm.dual_clip=null"],
    "drgrpo": ["algorithm.method=drgrpo", "algorithm.normalize_adv_std=false",
               "algorithm.loss_agg=seq-mean-token-sum-norm", "algorithm.clip_high=0.2"],
}


def train(overrides: list[str], log: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "rlsd_megatron.train",
               "--config", "examples/configs/cpu_demo.yaml", *overrides]
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"run failed ({' '.join(overrides)}); see {log}")


def val_rewards(log_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("val/reward")}


def evaluate(log_dir: Path, benchmarks: str) -> dict:
    """rlsd-eval of the run's final checkpoint (resumable: finished benchmarks are not redone)."""
    command = [sys.executable, "-m", "rlsd_megatron.eval", "--model", str(log_dir / "ckpt"), "--benchmarks",
               benchmarks, "--out", str(log_dir / "eval"), "--no-progress"]
    with (log_dir / "eval.log").open("w") as out:
        if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"evaluation failed; see {log_dir / 'eval.log'}")
    return json.loads((log_dir / "eval" / "summary.json").read_text())["benchmarks"]


def first_step_reaching(curve: dict[int, float], threshold: float) -> int | None:
    return next((step for step in sorted(curve) if curve[step] >= threshold), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=["rlsd", "grpo", "opsd"], choices=sorted(METHOD_OVERRIDES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--out", default="runs/compare_methods")
    parser.add_argument("--benchmarks", default="examples/benchmarks/reversed_addition.yaml",
                        help="rlsd-eval benchmark list run on each final checkpoint")
    args = parser.parse_args()
    out = Path(args.out)
    curves: dict[str, list[dict[int, float]]] = {m: [] for m in args.methods}
    evaluations: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        warm = out / f"seed{seed}" / "warm_start"
        if not (warm / "latest_checkpointed_iteration.txt").exists():
            print(f"seed {seed}: warm start", flush=True)
            warm.parent.mkdir(parents=True, exist_ok=True)
            train([f"train.seed={seed}", "train.steps=0", f"warm_start.output={warm}",
                   f"logging.dir={warm.parent / 'warm_start_logs'}"], warm.parent / "warm_start.log")
        for method in args.methods:
            log_dir = out / f"seed{seed}" / method
            earlier = val_rewards(log_dir) if log_dir.exists() else {}
            if args.steps in earlier and (log_dir / "ckpt").is_dir():  # finished by an earlier invocation
                print(f"seed {seed}: {method} (done)", flush=True)
                curves[method].append(earlier)
            else:
                shutil.rmtree(log_dir, ignore_errors=True)
                print(f"seed {seed}: {method}", flush=True)
                train([f"train.seed={seed}", f"train.steps={args.steps}", "warm_start.max_steps=0",
                       f"checkpoint.init_from={warm}", f"logging.dir={log_dir}", f"checkpoint.dir={log_dir / 'ckpt'}",
                       f"checkpoint.save_interval={args.steps}", *METHOD_OVERRIDES[method]],
                      out / f"seed{seed}" / f"{method}.log")
                curves[method].append(val_rewards(log_dir))
            evaluations[method].append(evaluate(log_dir, args.benchmarks))
    for seed in args.seeds:  # a seed whose warm start did not learn the task gives RL nothing to work with
        lines = [line for line in (out / f"seed{seed}" / "warm_start.log").read_text().splitlines()
                 if "[warm start" in line]
        print(f"seed {seed} warm start ended: {lines[-1].split('] ', 1)[-1] if lines else 'unknown'}")
    report(curves, args.thresholds, out)
    from rlsd_megatron.eval.comparison import comparison_table

    table = comparison_table(evaluations)
    (out / "benchmarks.md").write_text(table)
    print(f"benchmarks ({args.benchmarks}, final checkpoints):\n{table}", end="")


def report(curves: dict[str, list[dict[int, float]]], thresholds: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method, runs in curves.items():
        steps = sorted(set.intersection(*(set(run) for run in runs)))
        means = [statistics.fmean(run[s] for run in runs) for s in steps]
        errors = [statistics.stdev(run[s] for run in runs) / len(runs) ** 0.5 if len(runs) > 1 else 0.0 for s in steps]
        axis.plot(steps, means, label=f"{method} (n={len(runs)})")
        axis.fill_between(steps, [m - e for m, e in zip(means, errors)], [m + e for m, e in zip(means, errors)], alpha=0.2)
        run_means = [statistics.fmean(run.values()) for run in runs]
        spread = (f" ± {statistics.stdev(run_means) / len(runs) ** 0.5:.3f} (s.e. over {len(runs)} seeds)"
                  if len(runs) > 1 else " (one seed: no error bar)")
        print(f"{method}: mean validation reward over the run {statistics.fmean(run_means):.3f}{spread}")
        for threshold in thresholds:
            reached = [first_step_reaching(run, threshold) for run in runs]
            print(f"  steps to reach {threshold}: {reached} (None: not reached)")
    axis.set_xlabel("RL step")
    axis.set_ylabel("validation reward (exact match, T=0.7)")
    axis.set_title("reversed addition, 0.6M-param Llama from a shared warm start (mean ± s.e.)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "val_reward.png", dpi=120)
    print(f"plot: {out / 'val_reward.png'}")


if __name__ == "__main__":
    main()
