"""The real `slurm/rlsd_8b.sh` launch logic on localhost: fake `srun` / `scontrol`
(tests/slurm/fake_slurm.py) and a SLURM job environment of 2 "nodes" x 2 processes, training the
tiny CPU model (gloo, TP=2 x DP=2, embedded engine). Attempt 0 gets the time-limit warning
(SIGUSR1) mid-run: the trainer checkpoints, the script requeues the job; attempt 1 resumes from
that checkpoint and finishes. Also: `--dry-run` output, a refused layout, shellcheck."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlsd_megatron.parallel.local_pool import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))
LAUNCHERS = sorted((ROOT / "slurm").glob("rlsd_*.sh"))
TINY = ("model.hidden_size=32 model.num_layers=2 model.num_attention_heads=4 model.ffn_hidden_size=64 "
        "parallel.tp=2 warm_start.max_steps=0 train.prompts_per_step=4 rollout.n=2 train.micro_batch_size=4 "
        "train.eval_interval=0 checkpoint.save_interval=0 logging.log_interval=1 train.steps=12")


def job_env(tmp: Path, *, attempt: int, extra_args: str = TINY) -> dict[str, str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("srun", "scontrol"):
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/bash\nexec {sys.executable} {Path(__file__).parent / "fake_slurm.py"} {tool} "$@"\n')
        wrapper.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "RANK", "MASTER_"))}
    env.update({
        "PATH": f"{bin_dir}:{env['PATH']}", "PYTHONPATH": str(ROOT),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "rlsd-test", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_ON_NODE": "2",
        "SLURM_RESTART_COUNT": str(attempt), "FAKE_SLURM_NODES": "2", "FAKE_SLURM_LOG": str(tmp / "scontrol.log"),
        "MASTER_PORT": str(free_port()), "RLSD_PYTHON": sys.executable, "RLSD_HOME": str(ROOT),
        "RLSD_CONFIG": "examples/configs/cpu_demo.yaml", "RLSD_CKPT_DIR": str(tmp / "ckpt"),
        "RLSD_LOGS": str(tmp / "logs"), "RLSD_EXTRA_ARGS": extra_args, "OMP_NUM_THREADS": "1",
    })
    return env


def read_logs(tmp: Path, attempt: int) -> str:
    return "\n".join(path.read_text() for path in sorted((tmp / "logs" / "rlsd-test-4242" / f"attempt-{attempt}").glob("*.log")))


@pytest.mark.slow
def test_two_nodes_warning_checkpoints_requeues_and_resumes(tmp_path):
    script = str(ROOT / "slurm" / "rlsd_8b.sh")
    first = subprocess.Popen(["bash", script], env=job_env(tmp_path, attempt=0), cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The warning arrives once step 1 is logged (the last rank logs every step).
    deadline = time.monotonic() + 600
    while "[step 1/12" not in (read_logs(tmp_path, 0) if (tmp_path / "logs").exists() else ""):
        assert first.poll() is None, first.communicate()[0][-3000:] + read_logs(tmp_path, 0)[-3000:]
        assert time.monotonic() < deadline, read_logs(tmp_path, 0)[-3000:]
        time.sleep(0.5)
    first.send_signal(signal.SIGUSR1)
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:] + read_logs(tmp_path, 0)[-3000:]
    assert "requeueing job 4242" in output
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    logs = read_logs(tmp_path, 0)
    assert "checkpoint saved" in logs, logs[-3000:]
    saved = int((tmp_path / "ckpt" / "rlsd-test-4242" / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= saved < 12

    second = subprocess.run(["bash", script], env=job_env(tmp_path, attempt=1), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:] + read_logs(tmp_path, 1)[-3000:]
    assert "training finished" in second.stdout
    assert f"resumed from" in read_logs(tmp_path, 1) and f"at step {saved}" in read_logs(tmp_path, 1)
    assert (tmp_path / "ckpt" / "rlsd-test-4242" / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    # One rendezvous over 4 ranks on 2 "nodes": every rank wrote its own log, and one event file.
    assert len(list((tmp_path / "logs" / "rlsd-test-4242" / "attempt-1").glob("rank-*.log"))) == 4
    assert list((tmp_path / "logs" / "rlsd-test-4242" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("script", LAUNCHERS, ids=[path.name for path in LAUNCHERS])
def test_dry_run_prints_layout_plan_and_command(script):
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["RLSD_PYTHON"] = sys.executable
    result = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", script.read_text(), re.M).group(1))
    assert f"{nodes} node(s) x 8 GPU(s) = {nodes * 8} ranks" in result.stdout
    assert "fits" in result.stdout and "DOES NOT FIT" not in result.stdout
    assert "srun --nodes=" in result.stdout and "-m rlsd_megatron.train" in result.stdout


def test_planner_refusal_stops_the_launch():
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(RLSD_PYTHON=sys.executable, RLSD_NODES="4")  # the 70B layout on 32 GPUs: DP=1, no room
    result = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_70b.sh"), "--dry-run"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "DOES NOT FIT" in result.stdout + result.stderr
    assert "nothing was launched" in result.stderr and "srun --nodes" not in result.stdout
    assert result.stderr.splitlines()[-1] == ("rlsd: error: the layout does not fit in GPU memory on 32 GPUs (rlsd-plan's "
                                              "table above); nothing was launched")


def dry_run_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "RLSD_"))}
    env.update(RLSD_PYTHON=sys.executable, **extra)
    return env


def test_dry_run_with_an_invalid_override_says_the_config_is_invalid():
    result = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh"), "--dry-run", "train.steps=abc"],
                            env=dry_run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr == ("rlsd-plan: error: train.steps: expected int, got 'abc' (str)\n"
                             "rlsd: error: the config, its overrides or the layout for 8 GPUs are invalid (rlsd-plan's "
                             "error above); nothing was launched\n")
    assert "srun --nodes" not in result.stdout


@pytest.mark.parametrize("variables, message", [
    ({"RLSD_MODEL": "/nope/Qwen3-8B"}, "RLSD_MODEL=/nope/Qwen3-8B is not a directory; set RLSD_MODEL to the HF model "
                                       "directory (config.json, tokenizer, weights)"),
    ({"RLSD_MODEL": "{tmp}"}, "RLSD_MODEL={tmp} has no config.json; set RLSD_MODEL to the HF model directory "
                              "(config.json, tokenizer, weights)"),
    ({"RLSD_INIT_CKPT": "/nope/ckpt"}, "RLSD_INIT_CKPT=/nope/ckpt is not a directory; set it to the Megatron checkpoint "
                                       "of the model (the --out of tools/convert_hf_to_megatron.py)"),
    ({"RLSD_DATA": "/nope/data"}, "RLSD_DATA=/nope/data is not a directory; set it to the directory holding "
                                  "train.parquet and val.parquet"),
    ({"RLSD_DATA": "{tmp}"}, "RLSD_DATA={tmp} has no train.parquet; put train.parquet and val.parquet there, or unset "
                             "RLSD_DATA and set RLSD_TRAIN_FILES (and RLSD_VAL_FILES)"),
    ({"RLSD_TRAIN_FILES": "{tmp}/a.parquet,/nope/b.parquet"},
     "RLSD_TRAIN_FILES: data file '/nope/b.parquet' does not exist (relative paths start at {root}); give "
     "comma-separated .parquet / .jsonl / .json files"),
], ids=["model-missing", "model-without-config", "init-ckpt", "data-missing", "data-empty", "train-files"])
def test_dry_run_checks_the_input_paths(tmp_path, variables, message):
    (tmp_path / "a.parquet").write_text("")
    variables = {key: value.format(tmp=tmp_path) for key, value in variables.items()}
    result = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh"), "--dry-run"], env=dry_run_env(**variables),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr == "rlsd: error: " + message.format(tmp=tmp_path, root=ROOT) + "\n"
    assert "== memory plan" not in result.stdout  # stopped before the planner


def test_missing_input_stops_the_job_before_srun(tmp_path):
    env = job_env(tmp_path, attempt=0)
    env.update(RLSD_INIT_CKPT=str(tmp_path / "no-such-checkpoint"))
    result = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1
    assert result.stderr == (f"rlsd: error: RLSD_INIT_CKPT={tmp_path / 'no-such-checkpoint'} is not a directory; set it "
                             "to the Megatron checkpoint of the model (the --out of tools/convert_hf_to_megatron.py)\n")
    assert not (tmp_path / "logs").exists()  # srun never ran: no rank logs


def test_outside_a_job_without_dry_run_is_refused():
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(RLSD_PYTHON=sys.executable, RLSD_CONFIG="examples/configs/cpu_demo.yaml", RLSD_NODES="1",
               RLSD_GPUS_PER_NODE="2")
    result = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "not inside a SLURM job" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.name for path in SCRIPTS])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
