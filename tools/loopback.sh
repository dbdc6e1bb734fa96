#!/usr/bin/env bash
# Run a command with LSL restricted to this machine: LSLAPICFG points at a loopback-only
# configuration, and the command runs inside a network namespace holding only loopback
# when one can be made (root), so nothing it opens can send discovery traffic elsewhere.
#   bash tools/loopback.sh .venv/bin/python -m pytest
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export LSLAPICFG="${LSLAPICFG:-$ROOT/tests/lsl_loopback.cfg}"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$ROOT/.numba_cache}"
mkdir -p "$NUMBA_CACHE_DIR"
if [ "$#" -eq 0 ]; then
  echo "usage: bash tools/loopback.sh COMMAND [ARGS...]" >&2
  exit 2
fi
if unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
else
  echo "note: no network namespace (needs root); running with the loopback-only LSL config alone" >&2
  exec "$@"
fi
