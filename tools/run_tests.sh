#!/usr/bin/env bash
# Run the test suite as CI does: a loopback-only LSL configuration, inside a network
# namespace that holds only loopback when one can be made (root), so no test can send
# LSL discovery traffic anywhere else. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export LSLAPICFG="$PWD/tests/lsl_loopback.cfg"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.numba_cache}"
mkdir -p "$NUMBA_CACHE_DIR"
PY="${PYTHON:-$PWD/.venv/bin/python}"
if unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$PY" -m pytest "$@"
else
  echo "note: no network namespace (needs root); running with the loopback-only LSL config alone" >&2
  exec "$PY" -m pytest "$@"
fi
