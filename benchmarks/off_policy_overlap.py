"""Step time of one-step-off-policy (`train.off_policy_steps=1`) against synchronous rollouts, both
with the embedded engine on its own process (`rollout.placement=separate`), in the same run (CPU).

    .venv/bin/python benchmarks/off_policy_overlap.py                  # 1 learner + 1 engine process
    .venv/bin/python benchmarks/off_policy_overlap.py --steps 12 --prompts 16

What is timed: `Trainer.train_step` on the learner (wall clock; median over the steps after the
first two, which pay start-up costs), once per mode in the same process pool, the same config and
seed. Synchronous: the learner waits for every batch, the engine for every update. Off-policy: the
engine generates step n+1's batch while the learner scores and trains step n, so a step takes about
max(generation, learner work) instead of their sum. Also printed: the mean `perf/overlap_frac` (the
share of generation the learner did not wait for) and the learner's and engine's waits. On a
machine with fewer cores than processes the two sides compete for CPUs and the ratio says little.
Run from the repository root with it on the path (`PYTHONPATH=.` in a worktree).

Measured (2026-12-05) on the 2-core dev box (load 3-10 from other jobs), cpu_demo model, 16 prompts
x 8 samples, grpo, 1 learner + 1 engine process:
    --steps 8: synchronous 1.169 s, off-policy 0.723 s (overlap 0.89) -> 0.62x
    --steps 6: synchronous 1.013 s, off-policy 0.887 s (overlap 0.87) -> 0.88x (busier host)
On a quiet machine (load < 1) the learner's work is the larger side (the engine waits 0.19 s a step),
so overlap saves the learner's wait for generation only:
    --steps 8 and --steps 12: synchronous 0.296 / 0.300 s, off-policy 0.243 / 0.245 s (overlap 0.87 / 0.90) -> 0.82x
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def steps_of(mode: str, args: dict) -> dict:
    """On every rank: the run of one mode; the learner returns its step times and perf figures."""
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import is_engine_rank, model_parallel
    from rlsd_megatron.rollout.separate import run_engine_rank
    from rlsd_megatron.trainer.trainer import Trainer

    cfg = load_config("examples/configs/cpu_demo.yaml", [
        "warm_start.max_steps=0", "algorithm.method=grpo", "rollout.placement=separate", "rollout.engine_ranks=1",
        f"train.off_policy_steps={1 if mode == 'off_policy' else 0}", f"train.steps={args['steps']}",
        f"train.prompts_per_step={args['prompts']}", f"rollout.n={args['n']}", "train.eval_interval=1000",
        f"logging.dir={args['log_dir']}/{mode}"])
    with model_parallel(seed=cfg.train.seed, engine_ranks=1):
        if is_engine_rank():
            run_engine_rank(cfg)
            return {}
        trainer = Trainer(cfg)
        trainer.sync_weights()
        seconds, metrics = [], []
        for step in range(1, args["steps"] + 1):
            trainer.step = step
            started = time.perf_counter()
            metrics.append(trainer.train_step())
            seconds.append(time.perf_counter() - started)
        trainer.close()
    kept = slice(2, None)

    def mean(key):
        return statistics.mean(m.get(key, 0.0) for m in metrics[kept])

    return {"step_seconds": statistics.median(seconds[kept]), "overlap_frac": mean("perf/overlap_frac"),
            "learner_wait_seconds": mean("perf/learner_wait_seconds"),
            "engine_wait_seconds": mean("perf/engine_wait_seconds")}


def main() -> None:
    import tempfile

    from rlsd_megatron.parallel.local_pool import LocalProcessPool

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per mode (the first two are not timed)")
    parser.add_argument("--prompts", type=int, default=16, help="train.prompts_per_step")
    parser.add_argument("--n", type=int, default=8, help="rollout.n")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error(f"--steps={args.steps}: need at least 3 (the first two are not timed)")
    settings = {"steps": args.steps, "prompts": args.prompts, "n": args.n, "log_dir": tempfile.mkdtemp()}
    with LocalProcessPool(2, start_timeout=900) as pool:
        results = {mode: pool.run(steps_of, mode, settings, timeout=3600)[0] for mode in ("synchronous", "off_policy")}
    for mode, result in results.items():
        print(f"{mode:12s} step {result['step_seconds']:.3f} s  overlap {result['overlap_frac']:.2f}  learner waits "
              f"{result['learner_wait_seconds']:.3f} s  engine waits {result['engine_wait_seconds']:.3f} s")
    ratio = results["off_policy"]["step_seconds"] / results["synchronous"]["step_seconds"]
    print(f"off-policy / synchronous step time: {ratio:.2f}x")
    print(json.dumps({"ratio": ratio, **{f"{m}_{k}": v for m, r in results.items() for k, v in r.items()}}))


if __name__ == "__main__":
    main()
