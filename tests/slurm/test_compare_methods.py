"""slurm/compare_methods.py: the composed configs (the preset with only the method's recipe
changed), the checks before submission, and the job graph it submits (a stand-in sbatch records
each call); slurm/eval.sh's command."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("compare_methods", ROOT / "slurm" / "compare_methods.py")
compare = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(compare)
VL_PRESET = ROOT / "examples" / "configs" / "rlsd_qwen3vl_8b.yaml"


def recipe(method: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / "configs" / f"{method}.yaml").read_text())


@pytest.mark.parametrize("method", compare.METHODS)
def test_a_composed_config_is_the_preset_with_the_methods_recipe(method):
    preset = yaml.safe_load(VL_PRESET.read_text())
    config, _ = compare.compose(VL_PRESET, method, "/ckpt/teacher", [])
    want = dict(recipe(method)["algorithm"], **({"teacher_model": "/ckpt/teacher"} if method == "opd" else {}))
    assert config["algorithm"] == want
    for section in ("model", "parallel", "data", "optimizer", "train", "rollout", "precision"):
        assert config.get(section) == preset.get(section), section
    # DAPO's overlong reward shaping is its own (its recipe's reward differs from RLSD's there only).
    shaping = {k: recipe("dapo")["reward"][k] for k in ("overlong_buffer", "overlong_factor", "overlong_max_length")}
    for key, value in shaping.items():
        assert config["reward"][key] == (value if method == "dapo" else preset["reward"][key])
    from rlsd_megatron.config import config_from_dict
    from rlsd_megatron.config_checks import validate_config

    validate_config(config_from_dict(config), 8)  # a valid config for the preset's 8 GPUs


def test_set_changes_one_methods_layout_and_never_its_algorithm():
    config, _ = compare.compose(VL_PRESET, "sdpo", None, ["rollout.mem_fraction_static=0.8"])
    assert config["rollout"]["mem_fraction_static"] == 0.8
    with pytest.raises(SystemExit, match="the methods must differ by their recipes only"):
        compare.compose(VL_PRESET, "sdpo", None, ["algorithm.teacher_ema_rate=0.1"])
    with pytest.raises(SystemExit, match="opd needs its larger teacher model"):
        compare.compose(VL_PRESET, "opd", None, [])


def fake_sbatch(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with an sbatch that records its arguments and RLSD_* variables and prints job ids 100, 101, ..."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/bin/bash\n"
        f'n=$(wc -l < "{log}" 2>/dev/null || echo 0)\n'
        f'echo "$((100 + n))|${{RLSD_CONFIG:-}}|${{RLSD_RUN_NAME:-}}|${{RLSD_EVAL_MODEL:-}}|${{RLSD_EVAL_OUT:-}}|$*" >> "{log}"\n'
        'echo "$((100 + n))"\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RLSD_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", RLSD_PYTHON=sys.executable, RLSD_CKPT_DIR=str(tmp_path / "ckpt"))
    return env, log


def run_compare(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "slurm" / "compare_methods.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_jobs_train_then_evaluate_each_run_then_tabulate(tmp_path):
    env, log = fake_sbatch(tmp_path)
    out = tmp_path / "out"
    args = ("slurm/rlsd_8b.sh", "--methods", "rlsd", "grpo", "--seeds", "1", "2", "--out", str(out),
            "--benchmarks", "examples/benchmarks/reversed_addition.yaml")
    refused = run_compare(env, *args)  # the base model's row needs RLSD_MODEL (a real model directory)
    assert refused.returncode == 1 and "set it (the model script needs it too) or give --no-base" in refused.stderr
    result = run_compare(env, *args, "--no-base")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    calls = [line.split("|", 5) for line in log.read_text().splitlines()]
    assert len(calls) == 2 * 2 * 2 + 1  # (train + eval) per seed and method, the table
    trains = [c for c in calls if c[2]]
    assert [c[2] for c in trains] == [f"compare-rlsd_8b-{m}-s{s}" for s in (1, 2) for m in ("rlsd", "grpo")]
    evals = [c for c in calls[:-1] if c[3]]
    for train, evaluation in zip(trains, evals):
        method = train[2].split("-")[-2]
        assert train[1] == str(out / "configs" / f"{method}.yaml")
        assert "--dependency=singleton" in train[5] and train[5].endswith("slurm/rlsd_8b.sh train.seed=" + train[2][-1])
        assert f"--dependency=afterok:{train[0]}" in evaluation[5] and evaluation[5].endswith("slurm/eval.sh")
        assert evaluation[3] == str(tmp_path / "ckpt" / train[2]) and evaluation[4] == str(out / "eval" / train[2])
    table = calls[-1][5]
    assert "--dependency=afterok:" + ":".join(c[0] for c in evals) in table
    assert f"rlsd_megatron.eval.comparison rlsd={out / 'eval' / trains[0][2]}" in table
    assert f"--out {out / 'benchmarks.md'}" in table
    assert yaml.safe_load((out / "configs" / "grpo.yaml").read_text())["algorithm"] == recipe("grpo")["algorithm"]
    assert len((out / "jobs.txt").read_text().splitlines()) == len(calls)


def test_a_method_that_does_not_fit_stops_the_launch_before_any_submission(tmp_path):
    env, log = fake_sbatch(tmp_path)
    result = run_compare(env, "slurm/rlsd_8b.sh", "--methods", "sdpo", "rlsd", "--out", str(tmp_path / "out"),
                         "--set", "sdpo:train.offload=none", "--no-base")
    assert result.returncode == 1
    assert "DOES NOT FIT" in result.stdout + result.stderr
    assert "sdpo" in result.stderr and "nothing was submitted" in result.stderr
    assert not log.exists()


def test_eval_job_dry_run_prints_the_rlsd_eval_command():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RLSD_"))}
    env.update(RLSD_PYTHON="python3", RLSD_EVAL_ENGINE_TP="2", RLSD_MODEL="/ckpt/Qwen3-VL-8B-Instruct")
    result = subprocess.run(["bash", str(ROOT / "slurm" / "eval.sh"), "--dry-run", "--chunk-prompts", "256"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "rlsd-eval job: python3 -m rlsd_megatron.eval --model <RLSD_EVAL_MODEL> --benchmarks <RLSD_EVAL_BENCHMARKS> "
        "--out <RLSD_EVAL_OUT> --backend sglang --engines 4 --engine-tp 2 --no-progress "
        "--tokenizer /ckpt/Qwen3-VL-8B-Instruct --chunk-prompts 256")
    env["RLSD_EVAL_ENGINE_TP"] = "3"
    result = subprocess.run(["bash", str(ROOT / "slurm" / "eval.sh"), "--dry-run"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "must divide the node's 8 GPUs" in result.stderr
