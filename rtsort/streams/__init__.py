"""Sources and sinks named by URI: ``file:PATH``, ``zmq:tcp://127.0.0.1:PORT``, ``lsl:NAME``; a query
``?format=...`` picks another wire format (:mod:`rtsort.streams.uri`)."""

from __future__ import annotations

import logging
import os
import queue
import threading

import numpy as np

from ..errors import StreamFormatError
from ..types import Chunk
from .replay import now, wait_until


class FileSource:
    """A recording read in chunks, as fast as possible (``speed=None``) or paced."""

    def __init__(self, recording, chunk_ms: float = 1.0, speed: float | None = None):
        self.recording = recording
        self.chunk = max(1, int(round(chunk_ms * recording.sampling_rate / 1000.0)))
        self.speed = speed
        self._it = recording.iter_chunks(self.chunk)
        self._t0 = None
        self.gaps, self.malformed = [], {}
        self.gains_to_uV, self.offsets_to_uV = recording.gains_to_uV, recording.offsets_to_uV

    def read(self) -> Chunk | None:
        c = next(self._it, None)
        if c is None:
            return None
        if self._t0 is None:
            self._t0 = now()
        if self.speed:  # paced: sample i was "taken" at t0 + i / (fs * speed)
            rate = self.recording.sampling_rate * self.speed
            c.timestamp = self._t0 + c.first_sample / rate
            wait_until(self._t0 + (c.first_sample + c.n_samples) / rate)
        else:  # as fast as possible: no acquisition time to speak of
            c.timestamp = None
        return c

    def close(self) -> None:
        pass


def open_source(uri: str, n_channels: int, sampling_rate: float, chunk_ms: float = 1.0,
                speed: float | None = None, gain_to_uV: float = 1.0, resolve_timeout: float = 5.0):
    """A source for ``uri``: ``file:PATH``, ``zmq:ADDRESS`` (``?format=openephys``: the Open Ephys ZMQ Interface
    plugin) or ``lsl:NAME``."""
    from .uri import split_uri

    scheme, target, fmt = split_uri(uri, "source")
    if scheme == "file":
        from ..io import open_recording

        return FileSource(open_recording(target), chunk_ms, speed)
    if scheme == "zmq":
        if fmt == "openephys":
            from .openephys import OpenEphysSource

            return OpenEphysSource(target, n_channels, sampling_rate, timeout_s=0.2)
        from .zmq import ZmqSource

        return ZmqSource(target, n_channels, sampling_rate, timeout_s=0.2, max_chunk_s=0.05)  # backlogs in 50 ms
    if scheme == "lsl":
        from .lsl import LslSource

        return LslSource(target, n_channels, sampling_rate, resolve_timeout=resolve_timeout, gain_to_uV=gain_to_uV)
    raise StreamFormatError(f"{uri}: unknown source; use file:PATH, zmq:tcp://HOST:PORT[?format=openephys] or "
                            "lsl:NAME")


# the wire format's four fields first, then more: latency_ms (emission minus trough, on the source clock; NaN
# without timestamps), confidence and flags (rtsort.types.SPIKE_DTYPE)
WIRE_SPIKE_DTYPE = np.dtype([("sample_index", "<i8"), ("unit", "<i4"), ("channel", "<i4"), ("timestamp", "<f8"),
                             ("amplitude", "<f4"), ("latency_ms", "<f4"), ("confidence", "<f4"), ("flags", "u1")])


def _env_int(name: str, default: int, low: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        raise StreamFormatError(f"{name}={text!r}: expected a whole number") from None
    if value < low:
        raise StreamFormatError(f"{name}={text!r}: must be >= {low}")
    return value


def _sink_buffers() -> dict:
    """What a ZeroMQ spike sink holds for a subscriber that does not read before it drops: ``RTSORT_ZMQ_SNDHWM``
    messages (default 100000) queued by ZeroMQ, then the TCP send buffer, ``RTSORT_ZMQ_SNDBUF`` bytes (default
    -1: the OS's, autotuned up to a few MB)."""
    return {"hwm": _env_int("RTSORT_ZMQ_SNDHWM", 100000, 1), "sndbuf": _env_int("RTSORT_ZMQ_SNDBUF", -1, -1)}


class ZmqSpikeSink:
    """Publish labelled spikes (wire format 'spikes', with the trough's time on the source clock).

    Each message's header carries ``seq`` (0, 1, 2, ...): PUB drops the
    messages a subscriber has not read once its queue holds ``RTSORT_ZMQ_SNDHWM``
    of them (never blocking the pipeline, never holding up the other
    subscribers), so a subscriber counts what it lost from the jumps in ``seq``
    (``RTSORT_ZMQ_SNDBUF`` bounds the TCP send buffer too: :func:`_sink_buffers`).
    """

    def __init__(self, uri: str):
        from .zmq import ZmqPublisher, spikes_message

        self.pub = ZmqPublisher(uri, **_sink_buffers())
        self._message = spikes_message
        self.seq = 0

    @property
    def dropped(self) -> int:
        return self.pub.dropped

    def write(self, spikes: np.ndarray, timestamps: np.ndarray, latency_ms: np.ndarray | None = None) -> None:
        out = np.empty(spikes.size, WIRE_SPIKE_DTYPE)
        for name in ("sample_index", "unit", "channel", "amplitude", "confidence", "flags"):
            out[name] = spikes[name]
        out["timestamp"] = timestamps
        out["latency_ms"] = np.nan if latency_ms is None else latency_ms
        self.pub.send(self._message(out, seq=self.seq))
        self.seq += 1

    def close(self) -> None:
        self.pub.close()


class CallbackSink:
    """Calls ``fn(spikes, timestamps)`` on its own thread; a slow callback loses batches (counted), never time.
    ``spikes`` holds SPIKE_DTYPE's fields and ``latency_ms``."""

    def __init__(self, fn, max_batches: int = 1000):
        self.fn = fn
        self.dropped = 0
        self._q = queue.Queue(maxsize=max_batches)
        self._thread = threading.Thread(target=self._loop, name="rtsort-callback", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                self.fn(*item)
            except Exception:  # a user's callback must not stop the runtime
                logging.getLogger("rtsort.streams").exception("spike callback raised; continuing")

    def write(self, spikes: np.ndarray, timestamps: np.ndarray, latency_ms: np.ndarray | None = None) -> None:
        if latency_ms is not None:
            spikes = _with_latency(spikes, latency_ms)
        try:
            self._q.put_nowait((spikes, timestamps))
        except queue.Full:
            self.dropped += spikes.size

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(5)


def _with_latency(spikes: np.ndarray, latency_ms: np.ndarray) -> np.ndarray:
    out = np.empty(spikes.size, np.dtype(spikes.dtype.descr + [("latency_ms", "<f4")]))
    for name in spikes.dtype.names:
        out[name] = spikes[name]
    out["latency_ms"] = latency_ms
    return out


def open_sink(uri, sampling_rate: float):
    """A sink for ``uri``: a callable, ``file:PATH.npz``, ``zmq:ADDRESS`` (``?format=openephys``: Event
    Broadcaster spike messages) or ``lsl:NAME`` (``?format=string``: unit ids as text markers)."""
    if callable(uri):
        return CallbackSink(uri)
    from .uri import split_uri

    scheme, target, fmt = split_uri(uri, "sink")
    if scheme == "file":
        from .files import SpikeFileSink

        return SpikeFileSink(target, sampling_rate)
    if scheme == "zmq":
        if fmt == "openephys":
            from .openephys import OpenEphysSpikeSink

            return OpenEphysSpikeSink(target, sampling_rate)
        return ZmqSpikeSink(target)
    if scheme == "lsl":
        from .lsl import LslMarkerSink, LslStringMarkerSink

        return LslStringMarkerSink(target) if fmt == "string" else LslMarkerSink(target)
    raise StreamFormatError(f"{uri}: unknown sink; use file:PATH.npz, zmq:tcp://127.0.0.1:PORT[?format=openephys] "
                            "or lsl:NAME[?format=string]")
