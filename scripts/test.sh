#!/usr/bin/env bash
# The test command (README, .ci/run): sets up .venv if needed, then runs the CPU test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow", or -m gpu on an H100).
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=$(bash scripts/env.sh | tail -n 1)
exec "$python_bin" -m pytest -q "$@"
