#!/usr/bin/env bash
# The main job on a fresh machine: sets up .venv if needed, then runs the CPU demo: RLSD on the
# built-in reversed-addition task, 2 processes over gloo (a supervised warm start, then RL),
# tensorboard logs in runs/cpu_demo. Extra arguments are config overrides, e.g.
# algorithm.method=grpo or parallel.tp=2.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,5s/^# \{0,1\}//p' "$0"
    echo "usage: bash scripts/quickstart.sh [section.key=value ...]   (any field of the config tree; see README.md)"
    exit 0
fi
bash scripts/env.sh >/dev/null
exec .venv/bin/torchrun --nproc-per-node 2 -m rlsd_megatron.train --config examples/configs/cpu_demo.yaml "$@"
