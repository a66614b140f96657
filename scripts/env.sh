#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv with Python >= 3.12 and the
# pinned dependencies of pyproject.toml ("[dev]" and "[real]" extras: the test suite's real-model
# tier reads GGUF files and GSM8K templates). Re-installs when pyproject.toml
# changes. Source it or run it; it prints the venv's python on the last line.
#
# Python: $PYTHON if set, else the first python3.12/3.13 found on PATH or under pyenv
# (megatron-core >= 0.17 needs Python >= 3.12).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.12 python3.13 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
                     "$HOME"/.pyenv/versions/3.13*/bin/python3.13 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "error: rlsd_megatron needs Python >= 3.12 (megatron-core >= 0.17); install it (e.g. pyenv install 3.12) or set PYTHON=/path/to/python3.12" >&2
    return 1
}

stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    python_bin=$(find_python)
    echo "setting up .venv with $python_bin (a few minutes: torch, megatron-core, transformers)" >&2
    [ -x .venv/bin/python ] || "$python_bin" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip >&2
    .venv/bin/python -m pip install --quiet -e ".[dev,real]" >&2
    rm -f .venv/.installed-*
    touch "$stamp"
fi
echo "$PWD/.venv/bin/python"
