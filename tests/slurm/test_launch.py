"""The real `slurm/rlsd_8b.sh` launch logic on localhost: fake `srun` / `scontrol`
(tests/slurm/fake_slurm.py: signals to every process of the step, SIGTERM kills it, failures
reported per node as srun does) and a SLURM job environment of 2 "nodes" x 2 processes, training
the tiny CPU model (gloo, TP=2 x DP=2, embedded engine, rewards in verifier worker processes).
One run through its attempts: a rank dies (requeue, its node excluded), the time-limit warning
(checkpoint at once, requeue), the end; a SIGTERM (the step is killed) and a resubmitted job that
resumes the run; learner nodes + an engine node (RLSD_ENGINE_NODES): which ranks land where, and a
run through the warning. Also: `--dry-run` output, containers, a refused layout, shellcheck."""

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
        "train.eval_interval=0 checkpoint.save_interval=1 logging.log_interval=1 train.steps=12 "
        "reward.custom_fn=tests.trainer.reward_fns:digit_fraction")
RUN = "cpu_demo"  # RLSD_RUN_NAME's default: the config's name (no RLSD_MODEL)


def job_env(tmp: Path, *, attempt: int, extra_args: str = TINY, job: str = "4242", nodes: int = 2) -> dict[str, str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("srun", "scontrol", "squeue"):
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/bash\nexec {sys.executable} {Path(__file__).parent / "fake_slurm.py"} {tool} "$@"\n')
        wrapper.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "RANK", "MASTER_"))}
    env.update({
        "PATH": f"{bin_dir}:{env['PATH']}", "PYTHONPATH": str(ROOT),
        "SLURM_JOB_ID": job, "SLURM_JOB_NAME": "rlsd-test", "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": f"node[01-0{nodes}]", "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_ON_NODE": "2",
        "SLURM_RESTART_COUNT": str(attempt), "FAKE_SLURM_NODES": str(nodes), "FAKE_SLURM_LOG": str(tmp / "slurm.log"),
        "MASTER_PORT": str(free_port()), "RLSD_PYTHON": sys.executable, "RLSD_HOME": str(ROOT),
        "RLSD_CONFIG": "examples/configs/cpu_demo.yaml", "RLSD_CKPT_DIR": str(tmp / "ckpt"),
        "RLSD_LOGS": str(tmp / "logs"), "RLSD_EXTRA_ARGS": extra_args, "OMP_NUM_THREADS": "1",
    })
    return env


def read_logs(tmp: Path, attempt: int) -> str:
    return "\n".join(path.read_text() for path in sorted((tmp / "logs" / RUN / f"attempt-{attempt}").glob("*.log")))


def slurm_calls(tmp: Path, command: str) -> list[str]:
    return [line for line in (tmp / "slurm.log").read_text().splitlines() if line.startswith(command)]


def latest_checkpoint(tmp: Path) -> int:
    return int((tmp / "ckpt" / RUN / "latest_checkpointed_iteration.txt").read_text())


def launch(tmp: Path, env: dict[str, str]) -> subprocess.Popen:
    # Its own session: a signal to the group reaches the batch shell and srun, as SLURM's does.
    return subprocess.Popen(["bash", str(ROOT / "slurm" / "rlsd_8b.sh")], env=env, cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(job: subprocess.Popen, tmp: Path, attempt: int, step: int) -> None:
    """Until the last rank has logged `step` of this attempt (it logs every step)."""
    deadline = time.monotonic() + 600
    while f"[step {step}/12" not in (read_logs(tmp, attempt) if (tmp / "logs").exists() else ""):
        assert job.poll() is None, job.communicate()[0][-3000:] + read_logs(tmp, attempt)[-3000:]
        assert time.monotonic() < deadline, read_logs(tmp, attempt)[-3000:]
        time.sleep(0.5)


def finish(job: subprocess.Popen, tmp: Path, attempt: int) -> str:
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output[-3000:] + read_logs(tmp, attempt)[-3000:]
    return output


@pytest.mark.slow
def test_a_run_survives_a_failed_node_and_the_time_limit_warning(tmp_path):
    # Attempt 0: rank 3 (node 2) dies after step 2: the job requeues itself without that node.
    output = finish(launch(tmp_path, {**job_env(tmp_path, attempt=0), "FAKE_SLURM_FAULT": "3:2"}), tmp_path, 0)
    assert "excluding node(s) node02" in output and "requeueing job 4242" in output
    assert slurm_calls(tmp_path, "update") == ["update JobId=4242 ExcNodeList=node02"]
    assert slurm_calls(tmp_path, "requeue") == ["requeue 4242"]
    assert latest_checkpoint(tmp_path) == 1  # saved every step; the rank died before step 2's save

    # Attempt 1: resumes; the time-limit warning mid-run: checkpoint at the next safe point, requeue.
    second = launch(tmp_path, job_env(tmp_path, attempt=1))
    wait_for_step(second, tmp_path, 1, 4)
    second.send_signal(signal.SIGUSR1)
    output = finish(second, tmp_path, 1)
    logs = read_logs(tmp_path, 1)
    assert "resumed from" in logs and "at step 1" in logs
    assert "checkpoint saved" in logs, logs[-3000:]
    assert slurm_calls(tmp_path, "requeue") == ["requeue 4242"] * 2
    saved = latest_checkpoint(tmp_path)
    assert 4 <= saved < 12

    # Attempt 2: resumes from the warning's checkpoint and finishes.
    third = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh")], env=job_env(tmp_path, attempt=2), cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:] + read_logs(tmp_path, 2)[-3000:]
    assert "training finished" in third.stdout
    assert f"at step {saved}" in read_logs(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == 12
    # One rendezvous over 4 ranks on 2 "nodes": every rank wrote its own log, and one event file.
    assert len(list((tmp_path / "logs" / RUN / "attempt-2").glob("rank-*.log"))) == 4
    assert list((tmp_path / "logs" / RUN / "tensorboard").glob("events.out.tfevents.*"))
    attempts = (tmp_path / "logs" / RUN / "attempts.log").read_text().splitlines()
    assert [line.split("\t")[2:] for line in attempts] == [
        ["attempt 0", "failed: exit status 137 on node02"], ["attempt 1", "stopped by SIGUSR1 (exit status 0)"],
        ["attempt 2", "finished"]]


@pytest.mark.slow
def test_sigterm_kills_the_step_and_a_resubmitted_job_resumes_the_run(tmp_path):
    env = job_env(tmp_path, attempt=0, nodes=1)
    first = launch(tmp_path, env)
    wait_for_step(first, tmp_path, 0, 3)
    os.killpg(first.pid, signal.SIGTERM)  # scancel: the batch shell and srun (which kills the tasks)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 143, output[-3000:]
    assert "srun ends the training processes" in output and not slurm_calls(tmp_path, "requeue")
    saved = latest_checkpoint(tmp_path)
    assert saved >= 2  # step 3's save may have been cut short: the previous one stays complete

    # A new job of the same run (new id, restart count 0): same checkpoints, next attempt number.
    second = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh")], env=job_env(tmp_path, attempt=0, nodes=1,
                                                                                     job="5151"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:] + read_logs(tmp_path, 1)[-3000:]
    assert f"at step {saved}" in read_logs(tmp_path, 1)
    attempts = (tmp_path / "logs" / RUN / "attempts.log").read_text().splitlines()
    assert [line.split("\t")[1:] for line in attempts] == [
        ["job 4242", "attempt 0", "terminated: exit status 137"], ["job 5151", "attempt 1", "finished"]]


@pytest.mark.slow
def test_containers_run_the_planner_and_the_training_in_the_image(tmp_path):
    env = job_env(tmp_path, attempt=0, extra_args=TINY.replace("train.steps=12", "train.steps=1"), nodes=1)
    env.update(RLSD_CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.10-py3", RLSD_CONTAINER_MOUNTS="/data:/data")
    result = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    container = (f"--container-image=nvcr.io/nvidia/pytorch:25.10-py3 --container-mounts=/data:/data "
                 f"--container-workdir={ROOT}")
    planner, training = slurm_calls(tmp_path, "srun")
    assert planner.startswith("srun --nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=1 " + container)
    assert training.startswith("srun --nodes=1 --ntasks-per-node=2 ") and training.endswith(container)


def test_a_trainer_that_stops_before_the_job_end_is_requeued(tmp_path):
    """The trainer's own stop for time (trainer/stopping.py: exit 0, "time" in RLSD_STOP_FILE) gets
    a requeue, and the trainer is told the job's end time. A stand-in for the training processes
    reports what it was given and stops so; the planner runs for real."""
    stand_in = tmp_path / "python"
    stand_in.write_text(f"""#!/bin/bash
if [[ " $* " == *" rlsd_megatron.train "* ]]; then
    echo "end=$RLSD_JOB_END_TIME" >>{tmp_path}/trainer.txt
    [[ $SLURM_PROCID == 0 ]] && echo time >"$RLSD_STOP_FILE"
    exit 0
fi
exec {sys.executable} "$@"
""")
    stand_in.chmod(0o755)
    env = job_env(tmp_path, attempt=0, nodes=1)
    env.update(RLSD_PYTHON=str(stand_in), FAKE_SLURM_END_TIME="2026-12-04T18:00:00", TZ="UTC")
    result = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "trainer.txt").read_text().splitlines() == ["end=1796407200"] * 2  # 2 ranks
    assert "checkpointed and stopped before the job's end" in result.stdout
    assert slurm_calls(tmp_path, "requeue") == ["requeue 4242"]
    attempts = (tmp_path / "logs" / RUN / "attempts.log").read_text()
    assert attempts.split("\t")[-1] == "stopped before the job's end\n"


def test_engine_nodes_are_the_last_nodes_and_their_ranks_the_engine_ranks(tmp_path):
    """RLSD_ENGINE_NODES=1 on 3 "nodes" x 2 GPUs, through the real launcher and the fake srun (which
    places ranks node by node, as --distribution=block asks): every task reports its rank and node
    and the command it was given; the ranks the trainer makes engines (the world's last
    rollout.engine_ranks: parallel/state.py) are exactly the last node's, as the layout lines say."""
    from rlsd_megatron.config import load_config
    from rlsd_megatron.config_checks import engine_ranks
    from rlsd_megatron.parallel.state import engine_ranks_of

    stand_in = tmp_path / "python"
    stand_in.write_text(f"""#!/bin/bash
if [[ " $* " == *" rlsd_megatron.train "* ]]; then
    echo "$SLURM_PROCID $SLURM_NODEID $SLURM_LOCALID $SLURM_NTASKS $*" >>{tmp_path}/tasks.txt
    exit 0
fi
exec {sys.executable} "$@"
""")
    stand_in.chmod(0o755)
    env = job_env(tmp_path, attempt=0, nodes=3)  # tp=2: 2 replicas, one per engine
    env.update(RLSD_PYTHON=str(stand_in), RLSD_ENGINE_NODES="1")
    result = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh")], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "learners:     ranks 0-3 on node(s) 1-2\n" in result.stdout
    assert "engines:      ranks 4-5 on node(s) 3, one rollout engine per GPU" in result.stdout
    assert "--distribution=block" in slurm_calls(tmp_path, "srun")[-1]
    tasks = sorted(line.split(" ", 4) for line in (tmp_path / "tasks.txt").read_text().splitlines())
    assert [(int(rank), int(node), int(local)) for rank, node, local, *_ in tasks] == [
        (rank, rank // 2, rank % 2) for rank in range(6)]
    command = tasks[0][4].split()
    cfg = load_config(command[command.index("--config") + 1], command[command.index("--config") + 2:])
    assert (cfg.rollout.placement, engine_ranks(cfg)) == ("separate", 2)
    engines = engine_ranks_of(int(tasks[0][3]), engine_ranks(cfg))
    assert {int(node) for rank, node, *_ in tasks if int(rank) in engines} == {2}  # the last node only
    assert {int(node) for rank, node, *_ in tasks if int(rank) not in engines} == {0, 1}


@pytest.mark.slow
def test_an_engine_node_run_checkpoints_on_the_warning_and_resumes(tmp_path):
    """2 "nodes" x 2: node 1 trains (dp=2), node 2's ranks serve as rollout engines, one step ahead
    (train.off_policy_steps=1). The time-limit warning reaches every process, the engines' too: they
    serve on, the learners checkpoint (with the next step's batch) and stop them; the requeued
    attempt resumes and finishes."""
    extra = TINY.replace("parallel.tp=2", "parallel.tp=1") + " train.off_policy_steps=1"
    first = launch(tmp_path, {**job_env(tmp_path, attempt=0, extra_args=extra), "RLSD_ENGINE_NODES": "1"})
    wait_for_step(first, tmp_path, 0, 3)
    first.send_signal(signal.SIGUSR1)
    output = finish(first, tmp_path, 0)
    assert "engines:      ranks 2-3 on node(s) 2" in output and "requeueing job 4242" in output
    assert "checkpoint saved" in read_logs(tmp_path, 0)
    saved = latest_checkpoint(tmp_path)
    assert 3 <= saved < 12

    second = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh")], cwd=tmp_path, capture_output=True, text=True,
                            env={**job_env(tmp_path, attempt=1, extra_args=extra), "RLSD_ENGINE_NODES": "1"},
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:] + read_logs(tmp_path, 1)[-3000:]
    assert f"at step {saved}" in read_logs(tmp_path, 1) and latest_checkpoint(tmp_path) == 12
    for attempt in (0, 1):  # the engine ranks ended cleanly both times
        for rank in (2, 3):
            log = (tmp_path / "logs" / RUN / f"attempt-{attempt}" / f"rank-{rank}.log").read_text()
            assert "Traceback" not in log, log[-3000:]


def test_engine_nodes_must_leave_a_node_to_train():
    result = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_8b.sh"), "--dry-run"],
                            env=dry_run_env(RLSD_NODES="2", RLSD_ENGINE_NODES="2"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr == ("rlsd: error: RLSD_ENGINE_NODES=2: give 0 (colocated engines) up to 1 of the 2 nodes, "
                             "leaving nodes to train\n")


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
    # The 70B layout on 32 GPUs (DP=1) with the learner resident while the engine generates: no room.
    env.update(RLSD_PYTHON=sys.executable, RLSD_NODES="4")
    result = subprocess.run(["bash", str(ROOT / "slurm" / "rlsd_70b.sh"), "--dry-run", "train.offload=none",
                             "rollout.mem_fraction_static=0.45"], env=env,
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
