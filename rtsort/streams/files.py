"""The crash-safe spike file: an append-only log while running, the spikes contract (.npz) at the end.

Each batch of spikes is appended to ``PATH.log`` (fixed-size binary records
after a JSON header line) with unbuffered writes, so a ``kill -9`` of rtsort loses
nothing that was written (a power cut: at most what the OS had not written).
On close the log becomes ``PATH`` (the .npz contract, in trough order) and is
removed. A log left by a crashed run is turned into ``PATH`` by
:func:`recover_spike_file` (``rtsort recover PATH.log --out PATH``;
``SpikeFileSink`` does it, into ``PATH.recovered.npz``, before starting over).
A write that fails (a full disk) never stops the run: the log is cut back to
its last whole record, the batch is counted in ``dropped`` and the error kept
in ``error``; later batches are tried again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import RecordingError
from ..io.spikes import as_spikes, save_spikes
from ..types import SPIKE_DTYPE

log = logging.getLogger("rtsort.streams.files")

LOG_MAGIC = "rtsort-spike-log"
# one fixed-size little-endian record per spike, after a one-line JSON header
RECORD_DTYPE = np.dtype([("sample_index", "<i8"), ("unit", "<i4"), ("channel", "<i4"), ("amplitude", "<f4"),
                         ("distance", "<f4"), ("timestamp", "<f8"), ("confidence", "<f4"), ("flags", "u1"),
                         ("latency_ms", "<f4")])


def log_path(path: Path) -> Path:
    return path.with_name(path.name + ".log")


def read_spike_log(path: str | Path) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(spikes, sampling_rate, timestamps, latencies in ms) from a spike log; a torn last record is ignored.

    The log is a JSON header line followed by raw ``RECORD_DTYPE`` records, so
    any tool can follow it while it grows: ``np.fromfile(f, dtype, offset=len(header))``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read the spike log ({exc.strerror or exc})") from None
    end = data.find(b"\n")
    try:
        header = json.loads(data[:end]) if end > 0 else {}
    except ValueError:
        header = {}
    if not isinstance(header, dict) or header.get("format") != LOG_MAGIC:
        raise RecordingError(f"{path}: not an rtsort spike log")
    try:
        fs = float(header["sampling_rate"])
    except (KeyError, TypeError, ValueError):
        raise RecordingError(f"{path}: the spike log's header has no valid sampling_rate") from None
    try:  # the header names the records' fields (a log of an older rtsort holds fewer)
        dtype = np.dtype([tuple(f) for f in header.get("fields", RECORD_DTYPE.descr)])
    except (TypeError, ValueError):
        raise RecordingError(f"{path}: the spike log's header has no valid fields") from None
    body = data[end + 1:]
    n = len(body) // dtype.itemsize  # the record being written when the process died is dropped
    rec = np.frombuffer(body, dtype=dtype, count=n)
    spikes = as_spikes(rec, n)
    latency = rec["latency_ms"].astype(np.float32) if "latency_ms" in dtype.names else np.full(n, np.nan, np.float32)
    return spikes, fs, rec["timestamp"].copy(), latency


def _in_trough_order(spikes: np.ndarray, *per_spike: np.ndarray) -> tuple[np.ndarray, ...]:
    """A live run's spikes leave nearly in trough order (peeled ones a little later): the file is in trough order."""
    order = np.lexsort((spikes["channel"], spikes["sample_index"]))
    return (spikes[order],) + tuple(a[order] for a in per_spike)


def recover_spike_file(log_file: str | Path, out: str | Path) -> Path:
    """Write the spikes contract ``out`` (in trough order) from a crashed run's log; return ``out``."""
    spikes, fs, ts, lat = read_spike_log(log_file)
    spikes, ts, lat = _in_trough_order(spikes, ts, lat)
    save_spikes(out, spikes, fs, timestamp=ts, latency_ms=lat)
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
        if self.log.exists():  # a crashed run's: into a name no earlier recovery holds
            recovered = self.path.with_name(self.path.stem + ".recovered.npz")
            k = 1
            while recovered.exists():
                recovered = self.path.with_name(f"{self.path.stem}.recovered-{k}.npz")
                k += 1
            recover_spike_file(self.log, recovered)
        self.sampling_rate = float(sampling_rate)
        header = {"format": LOG_MAGIC, "sampling_rate": self.sampling_rate, "fields": RECORD_DTYPE.descr}
        try:
            self._fh = open(self.log, "wb", buffering=0)
            self._write_all(json.dumps(header).encode() + b"\n")
        except OSError as exc:
            raise RecordingError(f"{self.log}: cannot write the spike log ({exc.strerror or exc})") from None
        self._size = self._fh.tell()  # bytes of whole records (and the header) in the log
        self.n = 0
        self.dropped = 0  # spikes whose write failed (a full disk)
        self.error = None  # the first write error, as text

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view.nbytes:  # an unbuffered write may take part of the bytes (a disk filling up)
            view = view[self._fh.write(view):]

    def write(self, spikes: np.ndarray, timestamps: np.ndarray | None = None,
              latency_ms: np.ndarray | None = None) -> None:
        """Append a batch (unbuffered writes: in the OS's hands at return, so it survives a kill -9).

        A failed write (OSError: no space, a file size limit) is counted in
        ``dropped`` and logged once; the log is cut back to its last whole
        record so that it stays readable, and the next batch is tried again.
        """
        if spikes.size == 0:
            return
        rec = np.empty(spikes.size, RECORD_DTYPE)
        for name in SPIKE_DTYPE.names:
            rec[name] = spikes[name]
        rec["timestamp"] = np.nan if timestamps is None else timestamps
        rec["latency_ms"] = np.nan if latency_ms is None else latency_ms
        try:
            self._write_all(rec.tobytes())
        except OSError as exc:
            self.dropped += spikes.size
            if self.error is None:
                self.error = f"{self.log}: {exc.strerror or exc}"
                log.error("%s; %d spikes written so far, later ones counted as dropped until writes succeed again",
                          self.error, self.n)
            try:  # a torn record would shift every later one: cut it
                os.ftruncate(self._fh.fileno(), self._size)
                self._fh.seek(self._size)
            except OSError:
                pass
            return
        self._size += rec.nbytes
        self.n += spikes.size

    def close(self) -> Path:
        if self._fh.closed:
            return self.path
        self._fh.close()
        spikes, fs, ts, lat = read_spike_log(self.log)
        spikes, ts, lat = _in_trough_order(spikes, ts, lat)
        try:
            save_spikes(self.path, spikes, fs, timestamp=ts, latency_ms=lat)
        except OSError as exc:  # the log stays: nothing written is lost
            self.path.with_name(self.path.name + ".tmp.npz").unlink(missing_ok=True)
            raise RecordingError(f"{self.path}: not written ({exc.strerror or exc}); its {spikes.size} spikes stay in "
                                 f"{self.log}: rtsort recover {self.log} --out {self.path}") from None
        self.log.unlink()
        log.info("%d spikes -> %s", spikes.size, self.path)
        return self.path
