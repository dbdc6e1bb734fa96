#!/usr/bin/env bash
# Install rtsort and everything it needs into ./.venv (idempotent).
# torch goes first and pinned: a looser spec on a machine without torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN="${PYTHON_BIN:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON_BIN" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[train,interop,export,scale,dev]"
.venv/bin/python -m pip check
echo "rtsort installed in .venv (activate with: source .venv/bin/activate)"
