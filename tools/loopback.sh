#!/usr/bin/env bash
# Run a command with LSL restricted to this machine: LSLAPICFG points at a loopback-only
# configuration, and the command always runs inside a fresh network namespace of its own
# that holds only loopback (unshare -n, then lo up), so nothing it opens can send discovery
# traffic anywhere else. Where no such namespace can be made it refuses to run.
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
# inside the new namespace: bring lo up, check that lo is all there is, mark it, run the command
INNER='ip link set lo up || exit 1
links="$(ip -o link show | awk -F": " "{print \$2}" | sed "s/@.*//" | sort -u | tr "\n" " ")"
if [ "$links" != "lo " ]; then echo "error: the new namespace holds $links, not loopback alone" >&2; exit 1; fi
export RTSORT_LOOPBACK_NETNS=1
exec "$@"'
if unshare -n true 2>/dev/null; then
  exec unshare -n sh -c "$INNER" sh "$@"
elif unshare -r -n true 2>/dev/null; then  # without root: a user namespace owns the network namespace
  exec unshare -r -n sh -c "$INNER" sh "$@"
else
  echo "error: cannot create a loopback-only network namespace (unshare -n needs root, or user" \
       "namespaces for unshare -r -n); refusing to run LSL code where its discovery could leave loopback" >&2
  exit 1
fi
