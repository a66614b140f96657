#!/usr/bin/env bash
# The main job on a fresh machine: sets up .venv if needed, then runs the CPU learner demo on
# 2 processes (gloo). Extra arguments are config overrides, e.g. parallel.tp=2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh >/dev/null
exec .venv/bin/torchrun --nproc-per-node 2 -m rlsd_megatron.learner_demo \
    --config examples/configs/learner_demo.yaml "$@"
