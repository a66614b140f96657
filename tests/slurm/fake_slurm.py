"""Stand-ins for `srun` and `scontrol` that run a SLURM job's steps on localhost, with the
semantics of the real ones that the launch scripts depend on.

`srun --nodes=N --ntasks-per-node=M [--output=PATTERN] ... command` starts N*M copies of the
command with the variables real srun gives each task (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, SLURM_NODEID), ranks filling the nodes in order (--distribution=block), each writing
to PATTERN with %t replaced by its rank (or to srun's own stdout). Like real SLURM:
- a forwarded SIGUSR1 / SIGUSR2 reaches *every* process of the step (slurmstepd signals the
  step's whole container), not only the task: here each task leads its own process group and
  the signal goes to the group, so the task's child processes (verifier workers) get it too;
- SIGTERM to srun kills the step: SIGKILL to every process of it (srun's "forcing job termination");
- with --kill-on-bad-exit=1 a failing task ends the others (SIGKILL);
- failures are reported on stderr as "srun: error: <node>: task <rank>: Exited with exit code <n>"
  (or ": Killed" for the tasks srun killed), nodes named node01, node02, ...
Each call appends "srun <options>" to $FAKE_SLURM_LOG. FAKE_SLURM_FAULT=RANK:STEP makes that task
die (SIGKILL) after training step STEP, as a failing node would (RLSD_KILL_AT_STEP, stopping.py). `scontrol show hostnames LIST` prints one
127.0.0.1 per node of $FAKE_SLURM_NODES; `scontrol requeue JOB` and `scontrol update ARGS` append
"requeue JOB" / "update ARGS" to $FAKE_SLURM_LOG; `squeue -h -j JOB -o %e` prints the job's end
time, $FAKE_SLURM_END_TIME (as SLURM does: local time, 2026-12-04T18:00:00), or N/A.
Usage: python fake_slurm.py {srun|scontrol} ARGS...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _log(line: str) -> None:
    with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
        log.write(line + "\n")


def _kill_group(task: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(task.pid, signum)
    except ProcessLookupError:
        pass


def srun(args: list[str]) -> int:
    options: dict[str, str] = {}
    while args and args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        options[key] = value
    _log("srun " + " ".join(f"--{key}={value}" if value else f"--{key}" for key, value in options.items()))
    nodes, per_node = int(options["nodes"]), int(options["ntasks-per-node"])
    tasks, killed = [], set()
    fault_rank, _, fault_step = os.environ.get("FAKE_SLURM_FAULT", "").partition(":")
    fault_rank = int(fault_rank) if fault_rank else None
    for node in range(nodes):
        for local in range(per_node):
            rank = node * per_node + local
            env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nodes * per_node),
                   "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node), "SLURM_STEP_NUM_NODES": str(nodes)}
            if fault_rank == rank:  # one rank of the step dies (the trainer's test hook)
                env["RLSD_KILL_AT_STEP"] = fault_step
            output = open(options["output"].replace("%t", str(rank)), "a") if "output" in options else None
            tasks.append(subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT if output else None,
                                          start_new_session=True))

    def kill_all() -> None:
        for rank, task in enumerate(tasks):
            if task.poll() is None:
                killed.add(rank)
            _kill_group(task, signal.SIGKILL)

    def forward(signum, _frame):
        if signum == signal.SIGTERM:
            print("srun: forcing job termination", file=sys.stderr, flush=True)
            kill_all()
            return
        for task in tasks:
            if task.poll() is None:
                _kill_group(task, signum)

    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(signum, forward)
    while True:
        codes = [task.poll() for task in tasks]
        failed = [code for code in codes if code not in (None, 0)]
        if failed and options.get("kill-on-bad-exit") == "1":
            kill_all()
        if all(code is not None for code in codes) or (failed and options.get("kill-on-bad-exit") == "1"):
            for task in tasks:
                task.wait()
            # The task that failed first is reported first, then those srun killed.
            for rank in sorted(range(len(tasks)), key=lambda r: r in killed):
                code, node = tasks[rank].returncode, f"node{rank // per_node + 1:02d}"
                if code:
                    how = f"Exited with exit code {code}" if code > 0 else "Killed"
                    print(f"srun: error: {node}: task {rank}: {how}", file=sys.stderr)
            codes = [task.returncode for task in tasks]
            first_failure = next((code for rank, code in enumerate(codes) if code and rank not in killed), None)
            if first_failure is None:
                first_failure = next((code for code in codes if code), 0)
            return first_failure if first_failure >= 0 else 128 - first_failure
        time.sleep(0.2)


def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(["127.0.0.1"] * int(os.environ["FAKE_SLURM_NODES"])))
        return 0
    if args[:1] == ["requeue"]:
        _log(f"requeue {args[1]}")
        return 0
    if args[:1] == ["update"]:
        _log("update " + " ".join(args[1:]))
        return 0
    print(f"fake scontrol: unsupported {args}", file=sys.stderr)
    return 1


def squeue(args: list[str]) -> int:
    if args[-2:] != ["-o", "%e"]:
        print(f"fake squeue: unsupported {args}", file=sys.stderr)
        return 1
    print(os.environ.get("FAKE_SLURM_END_TIME", "N/A"))
    return 0


if __name__ == "__main__":
    sys.exit({"srun": srun, "scontrol": scontrol, "squeue": squeue}[sys.argv[1]](sys.argv[2:]))
