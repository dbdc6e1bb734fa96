#!/usr/bin/env bash
# Run a command with LSL restricted to this machine: LSLAPICFG points at a loopback-only
# configuration, and the command runs inside a network namespace that holds only loopback
# (unshare -n, then lo up), so nothing it opens can send discovery traffic elsewhere.
# Without such a namespace (unshare needs root) it refuses to run, unless the current
# namespace already holds loopback alone.
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
only_loopback() {  # ip asks netlink, which answers for this namespace
  [ "$(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | sort -u | tr '\n' ' ')" = "lo " ]
}
if unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
elif only_loopback; then
  exec "$@"  # already inside a loopback-only namespace
else
  echo "error: cannot create a loopback-only network namespace (unshare -n needs root), and this one has" \
       "other interfaces; refusing to run LSL code where its discovery could leave loopback" >&2
  exit 1
fi
