"""ZeroMQ transport (wire format of ARCHITECTURE.md): two frames, a UTF-8 JSON header and the raw payload.

A source URI names the address to **connect** to (the acquisition side binds
its PUB socket); a sink URI names the address rtsort **binds** its PUB socket
to. Malformed messages are counted per kind, logged once per kind, and skipped;
a header is checked against its payload before anything is allocated, so a
header that claims gigabytes costs nothing. (ZeroMQ's MAXMSGSIZE is not set:
libzmq treats a frame over it as a protocol error and drops the connection
for good, without reconnecting.) A publisher that restarts (its
``first_sample`` goes back) is followed: the numbering continues, the time it
was away (from the timestamps) is a gap, and the restart is counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np

from ..errors import StreamFormatError
from ..types import Chunk

log = logging.getLogger("rtsort.streams.zmq")

SAMPLE_DTYPES = ("int16", "int32", "float32", "float64")
LOOPBACK = "tcp://127.0.0.1"


def parse_uri(uri: str) -> str:
    """``zmq:tcp://127.0.0.1:5555`` or ``zmq:ipc://...`` -> the ZeroMQ address."""
    addr = uri[4:] if uri.startswith("zmq:") else uri
    if not addr.startswith(("tcp://", "ipc://", "inproc://")):
        raise StreamFormatError(f"{uri}: a ZeroMQ address must start with tcp://, ipc:// or inproc://")
    return addr


def samples_message(samples: np.ndarray, first_sample: int, sampling_rate: float, timestamp: float,
                    **extra) -> list:
    """The two frames of a samples message."""
    samples = np.ascontiguousarray(samples)
    header = {"type": "samples", "dtype": samples.dtype.name, "n_samples": int(samples.shape[0]),
              "n_channels": int(samples.shape[1]), "first_sample": int(first_sample),
              "sampling_rate": float(sampling_rate), "timestamp": float(timestamp), **extra}
    return [json.dumps(header).encode(), samples]


def spikes_message(spikes: np.ndarray, **extra) -> list:
    """The two frames of a spikes message (a structured array; its dtype travels in ``fields``); ``extra`` keys
    join the header (the sink's message counter ``seq``)."""
    spikes = np.ascontiguousarray(spikes)
    header = {"type": "spikes", "n": int(spikes.size), "fields": [list(f) for f in spikes.dtype.descr], **extra}
    return [json.dumps(header).encode(), spikes]


def decode_spikes(frames: list) -> np.ndarray:
    header = json.loads(bytes(frames[0]))
    dtype = np.dtype([tuple(f) for f in header["fields"]])
    return np.frombuffer(frames[1], dtype=dtype, count=header["n"])


class ZmqSource:
    """Subscribe to a samples stream and yield :class:`Chunk` objects.

    Parameters
    ----------
    uri : str
        ``zmq:tcp://HOST:PORT`` to connect to.
    n_channels, sampling_rate : expected stream layout (messages that differ are malformed)
    timeout_s : float
        How long :meth:`read` waits for a message before returning None.
    max_chunk_s : float
        Messages already waiting that continue a chunk join it, up to this much: a sorter that fell behind reads
        its backlog in larger chunks, which cost less per sample, so the backlog drains (as an LSL inlet pulls
        it). A sorter that keeps up finds nothing waiting and gets each message as it comes. 0: one message
        per chunk (``rtsort run`` uses 0.05).
    """

    def __init__(self, uri: str, n_channels: int, sampling_rate: float, timeout_s: float = 1.0, context=None,
                 max_chunk_s: float = 0.0):
        import zmq

        self.address = parse_uri(uri)
        self.n_channels = int(n_channels)
        self.sampling_rate = float(sampling_rate)
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.RCVHWM, 100000)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.address)
        self.timeout_ms = int(timeout_s * 1000)
        self.max_chunk = int(round(max_chunk_s * self.sampling_rate))
        self._pending = None  # a decoded chunk that did not join the previous one
        self.coalesced = 0  # messages that joined an earlier one (a backlog read in larger chunks)
        self.malformed = Counter()
        self.restarts = 0  # times the publisher's first_sample went back (it restarted)
        self._offset = 0  # added to the publisher's first_sample: the numbering continues over restarts
        self._last_end = None  # the time just after the last chunk's last sample, on the sender's clock
        self.gaps = []  # (expected first sample, received first sample)
        self.next_sample = None
        self.n_samples = 0
        self.last_timestamp = None
        self.gain_to_uV = None  # from the first header that gives one

    def _bad(self, kind: str, detail: str) -> None:
        if not self.malformed[kind]:
            log.warning("%s: malformed message (%s): %s; counted and skipped from now on", self.address, kind, detail)
        self.malformed[kind] += 1

    def read(self) -> Chunk | None:
        """The next valid chunk, or None after ``timeout_s`` without one; valid messages already waiting that
        continue it (same dtype, no gap) join it, up to ``max_chunk_s``."""
        chunk, self._pending = self._pending or self._next(self.timeout_ms), None
        if chunk is None:
            return None
        parts, n = [chunk], chunk.n_samples
        while n < self.max_chunk:
            more = self._next(0)
            if more is None:
                break
            last = parts[-1]
            if more.first_sample != last.first_sample + last.n_samples or more.samples.dtype != chunk.samples.dtype \
                    or n + more.n_samples > self.max_chunk:
                self._pending = more
                break
            parts.append(more)
            n += more.n_samples
        if len(parts) == 1:
            return chunk
        self.coalesced += len(parts) - 1
        return Chunk(np.concatenate([c.samples for c in parts]), first_sample=chunk.first_sample,
                     timestamp=chunk.timestamp)

    def _next(self, timeout_ms: int) -> Chunk | None:
        """The next valid message's chunk, waiting up to ``timeout_ms`` for the first message."""
        while self.socket.poll(timeout_ms):
            chunk = self._decode(self.socket.recv_multipart(copy=False))
            if chunk is not None:
                return chunk
        return None

    def _decode(self, frames) -> Chunk | None:
        if len(frames) != 2:
            return self._bad("frames", f"{len(frames)} frames, expected 2")
        try:
            h = json.loads(bytes(frames[0].buffer).decode("utf-8"))
            if not isinstance(h, dict):
                raise ValueError("header is not an object")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return self._bad("header", f"bad JSON header ({exc})")
        if h.get("type") != "samples":
            return self._bad("type", f"type {h.get('type')!r}, expected 'samples'")
        try:
            dtype = str(h["dtype"])
            n, c, first = int(h["n_samples"]), int(h["n_channels"]), int(h["first_sample"])
            fs = float(h.get("sampling_rate", self.sampling_rate))
            ts = float(h.get("timestamp", np.nan))
            gain = float(h["gain_to_uV"]) if "gain_to_uV" in h else None
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            return self._bad("fields", f"missing or invalid header field ({exc})")
        if dtype not in SAMPLE_DTYPES:
            return self._bad("dtype", f"dtype {dtype!r}; allowed {SAMPLE_DTYPES}")
        if c != self.n_channels:
            return self._bad("channels", f"{c} channels, expected {self.n_channels}")
        if abs(fs - self.sampling_rate) > 1e-6 * self.sampling_rate:
            return self._bad("rate", f"sampling rate {fs:g} Hz, expected {self.sampling_rate:g}")
        payload = frames[1].buffer
        if n < 0 or len(payload) != n * c * np.dtype(dtype).itemsize:
            return self._bad("size", f"payload of {len(payload)} bytes for {n} x {c} {dtype}")
        samples = np.frombuffer(payload, dtype=dtype).reshape(n, c)
        sent_first = first
        first += self._offset
        if self.next_sample is not None and first < self.next_sample:
            # the sender restarted (over TCP nothing arrives out of order): continue the numbering after the
            # time it was away, as the timestamps tell it (0 without them)
            away = (ts - self._last_end) * self.sampling_rate if self._last_end is not None else np.nan
            missing = int(round(away)) if np.isfinite(away) and away > 0 else 0
            self._offset = self.next_sample + missing - sent_first
            self.restarts += 1
            log.warning("%s: the publisher restarted (first_sample %d); numbering continues at sample %d after %d "
                        "missing samples", self.address, sent_first, self.next_sample + missing, missing)
            first = sent_first + self._offset
        if self.next_sample is not None and first != self.next_sample:
            self.gaps.append((self.next_sample, first))
            log.warning("%s: gap of %d samples before sample %d", self.address, first - self.next_sample, first)
        self.next_sample = first + n
        self.n_samples += n
        self.last_timestamp = ts
        self._last_end = ts + n / self.sampling_rate
        if gain is not None and self.gain_to_uV is None:
            self.gain_to_uV = gain
        return Chunk(samples, first_sample=first, timestamp=ts)

    def stats(self) -> dict:
        """The source's own counts for the run's statistics."""
        return {"samples": self.n_samples, "restarts": self.restarts, "gaps": len(self.gaps),
                "gap_samples": int(sum(b - a for a, b in self.gaps)), "coalesced_messages": self.coalesced}

    def close(self) -> None:
        self.socket.close(0)


class ZmqPublisher:
    """A PUB socket bound to an address (127.0.0.1 unless the URI says otherwise); sends never block."""

    def __init__(self, uri: str, context=None, hwm: int = 100000, sndbuf: int = -1):
        import zmq

        self._zmq = zmq
        self.address = parse_uri(uri)
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.SNDBUF, sndbuf)  # -1: the OS's (autotuned)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.bind(self.address)
        self.dropped = 0

    def send(self, frames: list) -> bool:
        try:
            self.socket.send_multipart(frames, flags=self._zmq.NOBLOCK, copy=False)
            return True
        except self._zmq.Again:  # a slow subscriber: drop, count, never block the pipeline
            self.dropped += 1
            return False

    def close(self) -> None:
        self.socket.close()
