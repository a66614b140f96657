"""The paper's comparison on a SLURM cluster: RLSD and its baselines trained from one model script's
preset, each final checkpoint (and the base model) scored by rlsd-eval, and the table.

    # spec §7: Qwen3-VL-8B-Instruct, the five image benchmarks
    RLSD_MODEL=/ckpt/Qwen3-VL-8B-Instruct RLSD_INIT_CKPT=/ckpt/qwen3-vl-8b-mcore RLSD_DATA=/data/visual-math \\
      python slurm/compare_methods.py slurm/rlsd_qwen3vl_8b.sh --methods rlsd grpo opsd sdpo_paper grpo_opsd \\
        --seeds 1 --benchmarks examples/benchmarks/vision_language.yaml
    python slurm/compare_methods.py slurm/rlsd_qwen3vl_8b.sh --dry-run   # anywhere: checks, prints the sbatch commands

What each method trains with: the model script's preset (examples/configs/<preset>.yaml: model,
layout, data, images, batch, sampling, budget) with its `algorithm:` section replaced by the method
recipe's (examples/configs/<method>.yaml), plus what that recipe sets differently from the RLSD
recipe (examples/configs/rlsd.yaml) in its other sections (DAPO's overlong reward shaping), so
that the runs differ in their method only. The composed configs are written to
<out>/configs/<method>.yaml, each with a header naming what it took from the recipe.

In order, before anything is submitted:
1. every composed config goes through the model script's --dry-run (the config checks and the
   memory planner for its layout: SDPO's fp32 EMA teacher or OPD's teacher model may not fit
   where RLSD does); one failure stops the launch, nothing submitted;
2. per seed and method, the training job: `sbatch --job-name=<run> --dependency=singleton
   <model script> train.seed=<seed>` with RLSD_CONFIG = the composed config and RLSD_RUN_NAME =
   <prefix>-<method>-s<seed> (its checkpoints and logs: slurm/common.sh; a resubmitted job of the
   same name resumes it);
3. per run, slurm/eval.sh after it (--dependency=afterok) on its checkpoint directory, results in
   <out>/eval/<run>/; and once, the base model (RLSD_MODEL) as the row "base";
4. the table job after every evaluation: `python -m rlsd_megatron.eval.comparison` over them,
   written to <out>/benchmarks.md (a row per method, mean ± standard error over seeds).
Job ids and the commands go to <out>/jobs.txt. Rerunning submits everything again: training
resumes from the runs' checkpoints and rlsd-eval skips finished benchmarks, so a rerun after a
failure redoes only what is missing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "configs"
# The recipes (examples/configs/<name>.yaml): a method each, and sdpo_paper, SDPO as the RLSD paper ran it.
METHODS = ("rlsd", "grpo", "dapo", "drgrpo", "opd", "opsd", "sdpo", "sdpo_paper", "grpo_opsd")
# Spec §7's rows, with the base model: its SDPO number is the paper's own SDPO run (sdpo_paper).
PAPER_METHODS = ("rlsd", "grpo", "opsd", "sdpo_paper", "grpo_opsd")


def script_preset(script: Path) -> Path:
    """The preset a model script trains (its RLSD_DEFAULT_CONFIG line)."""
    for line in script.read_text().splitlines():
        if line.startswith("RLSD_DEFAULT_CONFIG="):
            return ROOT / line.split("=", 1)[1].strip()
    raise SystemExit(f"compare_methods: error: {script} sets no RLSD_DEFAULT_CONFIG: not a model script (slurm/rlsd_*.sh)")


def method_changes(method: str) -> dict[str, dict]:
    """What a method's recipe sets: its whole `algorithm:` section, and the keys of its other
    sections whose values differ from the RLSD recipe's."""
    recipe = yaml.safe_load((RECIPES / f"{method}.yaml").read_text())
    rlsd = yaml.safe_load((RECIPES / "rlsd.yaml").read_text())
    changes = {"algorithm": dict(recipe["algorithm"])}
    for section, values in recipe.items():
        if section == "algorithm":
            continue
        differing = {k: v for k, v in values.items() if v != (rlsd.get(section) or {}).get(k)}
        if differing:
            changes[section] = differing
    return changes


def compose(preset: Path, method: str, opd_teacher: str | None, layout: list[str]) -> tuple[dict, dict[str, dict]]:
    """The preset with the method's changes (`method_changes`); OPD's teacher model from `opd_teacher`;
    then the `layout` overrides given for this method (`--set`)."""
    from rlsd_megatron.config import apply_override

    config = yaml.safe_load(preset.read_text())
    changes = method_changes(method)
    if method == "opd":
        if not opd_teacher:
            raise SystemExit("compare_methods: error: opd needs its larger teacher model: --opd-teacher "
                             "<Megatron checkpoint> (algorithm.teacher_model)")
        changes["algorithm"]["teacher_model"] = opd_teacher
    config["algorithm"] = changes["algorithm"]
    for section, values in changes.items():
        if section != "algorithm":
            config.setdefault(section, {}).update(values)
    for override in layout:
        if override.split("=", 1)[0].startswith("algorithm."):
            raise SystemExit(f"compare_methods: error: --set {method}:{override}: the methods must differ by their "
                             "recipes only; --set is for memory and layout settings")
        apply_override(config, override)
    return config, changes


def write_config(path: Path, config: dict, preset: Path, method: str, changes: dict[str, dict],
                 layout: list[str]) -> None:
    taken = "; ".join(f"{section}: {', '.join(f'{k}={v}' for k, v in values.items())}"
                      for section, values in changes.items())
    header = (f"# Written by slurm/compare_methods.py: {preset.relative_to(ROOT)} with examples/configs/{method}.yaml's\n"
              f"# algorithm section and its other differences from the RLSD recipe.\n# From the recipe: {taken}\n"
              + (f"# Layout for this method (--set): {' '.join(layout)}\n" if layout else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))


def submit(command: list[str], env: dict[str, str], dry_run: bool, jobs: list[str], fake_id: int) -> str:
    """sbatch `command` with `env` added; its job id (a placeholder in a dry run)."""
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(command)
    if dry_run:
        job = f"<job{fake_id}>"
    else:
        result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT)
        if result.returncode:
            raise SystemExit(f"compare_methods: error: sbatch failed ({result.stderr.strip()}): {shown}")
        job = result.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    jobs.append(f"{job}\t{shown}")
    print(f"{job}: {shown}", flush=True)
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", type=Path, help="the model script (slurm/rlsd_*.sh) whose preset every method trains")
    parser.add_argument("--methods", nargs="+", default=list(PAPER_METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--benchmarks", default="examples/benchmarks/vision_language.yaml",
                        help="rlsd-eval's benchmark list for every checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="configs, evaluations, the table (default "
                                                               "runs/compare-<preset>)")
    parser.add_argument("--prefix", default=None, help="run names' first part (default compare-<preset>)")
    parser.add_argument("--opd-teacher", default=None, help="opd: the teacher's Megatron checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:SECTION.KEY=VALUE",
                        help="a memory or layout override for one method's runs (repeatable), e.g. "
                             "sdpo:rollout.mem_fraction_static=0.8 where its EMA teacher does not fit beside the preset's "
                             "engine share; algorithm.* is refused (the recipes define the methods)")
    parser.add_argument("--no-base", action="store_true", help="no base-model row (RLSD_MODEL not evaluated)")
    parser.add_argument("--dry-run", action="store_true", help="check and print the sbatch commands, submit nothing")
    args = parser.parse_args(argv)

    if not (args.no_base or args.dry_run or os.environ.get("RLSD_MODEL")):
        raise SystemExit("compare_methods: error: the base model's row evaluates RLSD_MODEL: set it (the model "
                         "script needs it too) or give --no-base")
    script = args.script.resolve()
    preset = script_preset(script)
    name = preset.stem
    out = (args.out or ROOT / "runs" / f"compare-{name}").resolve()
    prefix = args.prefix or f"compare-{name}"
    layouts: dict[str, list[str]] = {method: [] for method in args.methods}
    for item in args.set:
        method, sep, override = item.partition(":")
        if not sep or method not in layouts or "=" not in override:
            raise SystemExit(f"compare_methods: error: --set {item!r}: give METHOD:section.key=value for one of "
                             f"--methods {' '.join(args.methods)}")
        layouts[method].append(override)
    configs = {}
    for method in args.methods:
        config, changes = compose(preset, method, args.opd_teacher, layouts[method])
        configs[method] = out / "configs" / f"{method}.yaml"
        write_config(configs[method], config, preset, method, changes, layouts[method])
    for method, path in configs.items():  # every config and layout checked before anything is submitted
        check = subprocess.run(["bash", str(script), "--dry-run"], env={**os.environ, "RLSD_CONFIG": str(path)},
                               capture_output=True, text=True, cwd=ROOT)
        if check.returncode:
            sys.stderr.write(check.stdout[-3000:] + check.stderr[-3000:])
            print(f"compare_methods: error: {method} ({path}) does not pass {script.name} --dry-run (above); "
                  "nothing was submitted", file=sys.stderr)
            return 1
        print(f"checked {method}: {path.relative_to(out)} passes {script.name} --dry-run", flush=True)

    ckpt_root = Path(os.environ.get("RLSD_CKPT_DIR", Path(os.environ.get("RLSD_HOME", ROOT)) / "checkpoints"))
    eval_script = str(ROOT / "slurm" / "eval.sh")
    jobs: list[str] = []
    evaluations: list[tuple[str, str, Path]] = []  # (method, eval job, results)

    def evaluate(row: str, model: str, run: str, after: str | None) -> None:
        results = out / "eval" / run
        dependency = [f"--dependency=afterok:{after}"] if after else []
        env = {"RLSD_EVAL_MODEL": model, "RLSD_EVAL_BENCHMARKS": str(ROOT / args.benchmarks),
               "RLSD_EVAL_OUT": str(results)}
        job = submit(["sbatch", "--parsable", f"--job-name=eval-{run}", *dependency, eval_script], env,
                     args.dry_run, jobs, len(jobs))
        evaluations.append((row, job, results))

    if not args.no_base:
        evaluate("base", os.environ.get("RLSD_MODEL", "<RLSD_MODEL>"), f"{prefix}-base", None)
    for seed in args.seeds:
        for method in args.methods:
            run = f"{prefix}-{method}-s{seed}"
            train = submit(["sbatch", "--parsable", f"--job-name={run}", "--dependency=singleton", str(script),
                            f"train.seed={seed}"], {"RLSD_CONFIG": str(configs[method]), "RLSD_RUN_NAME": run},
                           args.dry_run, jobs, len(jobs))
            evaluate(method, str(ckpt_root / run), run, train)
    python = os.environ.get("RLSD_PYTHON", sys.executable)
    table = [python, "-m", "rlsd_megatron.eval.comparison", *(f"{row}={results}" for row, _, results in evaluations),
             "--out", str(out / "benchmarks.md")]
    submit(["sbatch", "--parsable", f"--job-name=table-{prefix}", "--ntasks=1", "--time=00:10:00",
            "--dependency=afterok:" + ":".join(job for _, job, _ in evaluations), f"--output={out / 'table.log'}",
            "--wrap", shlex.join(table)], {}, args.dry_run, jobs, len(jobs))
    if not args.dry_run:
        (out / "jobs.txt").write_text("\n".join(jobs) + "\n")
    print(f"{'would submit' if args.dry_run else 'submitted'} {len(jobs)} jobs; the table: {out / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
