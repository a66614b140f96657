"""Stand-ins for `srun` and `scontrol` that run a SLURM job's steps on localhost.

`srun --nodes=N --ntasks-per-node=M --output=PATTERN ... command` starts N*M copies of the
command with the variables real srun gives each task (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, SLURM_NODEID), each writing to PATTERN with %t replaced by its rank; it forwards
SIGUSR1 / SIGTERM to every task as srun does, and with --kill-on-bad-exit=1 kills the others
when one fails. `scontrol show hostnames LIST` prints one 127.0.0.1 per node of
$FAKE_SLURM_NODES; `scontrol requeue JOB` appends "requeue JOB" to $FAKE_SLURM_LOG.
Usage: python fake_slurm.py {srun|scontrol} ARGS...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def srun(args: list[str]) -> int:
    options: dict[str, str] = {}
    while args and args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        options[key] = value
    nodes, per_node = int(options["nodes"]), int(options["ntasks-per-node"])
    tasks = []
    for node in range(nodes):
        for local in range(per_node):
            rank = node * per_node + local
            env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nodes * per_node),
                   "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node), "SLURM_STEP_NUM_NODES": str(nodes)}
            output = open(options["output"].replace("%t", str(rank)), "a")
            tasks.append(subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT))

    def forward(signum, _frame):
        for task in tasks:
            if task.poll() is None:
                task.send_signal(signum)

    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGTERM, forward)
    while True:
        codes = [task.poll() for task in tasks]
        failed = [code for code in codes if code not in (None, 0)]
        if failed and options.get("kill-on-bad-exit") == "1":
            for task in tasks:
                if task.poll() is None:
                    task.kill()
            return failed[0] if failed[0] > 0 else 128 - failed[0]
        if all(code is not None for code in codes):
            return max(codes)
        time.sleep(0.2)


def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(["127.0.0.1"] * int(os.environ["FAKE_SLURM_NODES"])))
        return 0
    if args[:1] == ["requeue"]:
        with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
            log.write(f"requeue {args[1]}\n")
        return 0
    print(f"fake scontrol: unsupported {args}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit({"srun": srun, "scontrol": scontrol}[sys.argv[1]](sys.argv[2:]))
