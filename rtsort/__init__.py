"""rtsort: a real-time streaming spike sorter.

The runtime (preprocessing, detection, snippets, encoding, assignment, streams)
needs numpy, numba, onnxruntime and the transports only; torch lives in
:mod:`rtsort.train` and is never imported by the runtime.
"""

from __future__ import annotations

import logging
import os
import tempfile

__version__ = "0.2.0"

logger = logging.getLogger("rtsort")
logger.addHandler(logging.NullHandler())


def _ensure_numba_cache_dir() -> None:
    """Give numba a writable cache directory before any ``cache=True`` kernel loads.

    numba writes its cache beside the source file by default; in a read-only
    install an import with ``cache=True`` then fails outright. A user's
    ``NUMBA_CACHE_DIR`` always wins.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for candidate in (os.path.join(base, "rtsort", "numba"), os.path.join(tempfile.gettempdir(), "rtsort-numba")):
        try:
            os.makedirs(candidate, exist_ok=True)
            probe = os.path.join(candidate, ".write-test")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError:
            continue
        os.environ["NUMBA_CACHE_DIR"] = candidate
        return


_ensure_numba_cache_dir()
