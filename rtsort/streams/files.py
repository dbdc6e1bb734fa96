"""The crash-safe spike file: an append-only log while running, the spikes contract (.npz) at the end.

Each batch of spikes is appended to ``PATH.log`` (fixed-size binary records
after a JSON header line) with one unbuffered write, so a ``kill -9`` of rtsort loses
nothing that was written (a power cut: at most what the OS had not written).
On close the log becomes ``PATH`` (the .npz contract) and is removed. A log
left by a crashed run is turned into ``PATH`` by :func:`recover_spike_file`
(``SpikeFileSink`` does it, into ``PATH.recovered.npz``, before starting over).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import RecordingError
from ..io.spikes import save_spikes
from ..types import SPIKE_DTYPE

log = logging.getLogger("rtsort.streams.files")

LOG_MAGIC = "rtsort-spike-log"
# one fixed-size little-endian record per spike, after a one-line JSON header
RECORD_DTYPE = np.dtype([("sample_index", "<i8"), ("unit", "<i4"), ("channel", "<i4"), ("amplitude", "<f4"),
                         ("distance", "<f4"), ("timestamp", "<f8")])


def log_path(path: Path) -> Path:
    return path.with_name(path.name + ".log")


def read_spike_log(path: str | Path) -> tuple[np.ndarray, float, np.ndarray]:
    """(spikes, sampling_rate, timestamps) from a spike log; a torn last record is ignored.

    The log is a JSON header line followed by raw ``RECORD_DTYPE`` records, so
    any tool can follow it while it grows: ``np.fromfile(f, dtype, offset=len(header))``.
    """
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"\n")
    try:
        header = json.loads(data[:end]) if end > 0 else {}
    except ValueError:
        header = {}
    if header.get("format") != LOG_MAGIC:
        raise RecordingError(f"{path}: not an rtsort spike log")
    body = data[end + 1:]
    n = len(body) // RECORD_DTYPE.itemsize  # the record being written when the process died is dropped
    rec = np.frombuffer(body, dtype=RECORD_DTYPE, count=n)
    spikes = np.zeros(n, SPIKE_DTYPE)
    for name in SPIKE_DTYPE.names:
        spikes[name] = rec[name]
    return spikes, float(header["sampling_rate"]), rec["timestamp"].copy()


def recover_spike_file(log_file: str | Path, out: str | Path) -> Path:
    """Write the spikes contract ``out`` from a crashed run's log; return ``out``."""
    spikes, fs, ts = read_spike_log(log_file)
    save_spikes(out, spikes, fs, timestamp=ts)
    log.warning("recovered %d spikes from %s into %s", spikes.size, log_file, out)
    return Path(out)


class SpikeFileSink:
    """Append labelled spikes to ``PATH.log`` as they come; ``close()`` writes ``PATH`` (.npz)."""

    def __init__(self, path: str | Path, sampling_rate: float):
        self.path = Path(path)
        if self.path.suffix != ".npz":
            raise RecordingError(f"{self.path}: a spike file sink must end in .npz")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log_path(self.path)
        if self.log.exists():
            recover_spike_file(self.log, self.path.with_name(self.path.stem + ".recovered.npz"))
        self.sampling_rate = float(sampling_rate)
        self._fh = open(self.log, "wb", buffering=0)
        header = {"format": LOG_MAGIC, "sampling_rate": self.sampling_rate, "fields": RECORD_DTYPE.descr}
        self._fh.write(json.dumps(header).encode() + b"\n")
        self.n = 0

    def write(self, spikes: np.ndarray, timestamps: np.ndarray | None = None) -> None:
        """Append a batch (one unbuffered write: in the OS's hands at return, so it survives a kill -9)."""
        if spikes.size == 0:
            return
        rec = np.empty(spikes.size, RECORD_DTYPE)
        for name in SPIKE_DTYPE.names:
            rec[name] = spikes[name]
        rec["timestamp"] = np.nan if timestamps is None else timestamps
        self._fh.write(rec.tobytes())
        self.n += spikes.size

    def close(self) -> Path:
        if self._fh.closed:
            return self.path
        self._fh.close()
        spikes, fs, ts = read_spike_log(self.log)
        save_spikes(self.path, spikes, fs, timestamp=ts)
        self.log.unlink()
        log.info("%d spikes -> %s", spikes.size, self.path)
        return self.path
