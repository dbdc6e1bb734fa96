"""Publish a recording as a live stream, paced against an absolute clock so it never drifts."""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import StreamFormatError
from ..stats import Distribution
from .zmq import ZmqPublisher, samples_message

log = logging.getLogger("rtsort.streams.replay")


try:  # the stream clock: pylsl.local_clock() (CLOCK_MONOTONIC on Linux), or time.monotonic without pylsl
    from pylsl import local_clock as now
except ImportError:  # pragma: no cover
    now = time.monotonic


def wait_until(t: float) -> None:
    """Sleep until ``t`` on the stream clock (Linux's high-resolution timers overshoot by ~0.1 ms).

    No busy-wait: on a 2-core machine a spinning sender would take the core the
    sorter needs.
    """
    left = t - now()
    while left > 0:
        time.sleep(left)
        left = t - now()


def _sender(recording, to: str, chunk: int):
    """A function (samples, first_sample, t_first, t_last) -> None for the destination, and its closer."""
    fs = recording.sampling_rate
    if to.startswith("zmq:"):
        pub = ZmqPublisher(to)
        gain = float(np.mean(recording.gains_to_uV))

        def send(samples, first, t_first, t_last):
            pub.send(samples_message(samples, first, fs, t_first, gain_to_uV=gain))
        return send, pub
    if to.startswith("lsl:"):
        from .lsl import LslSamplesOutlet

        out = LslSamplesOutlet(to[4:], recording.n_channels, fs, chunk)
        gains = np.asarray(recording.gains_to_uV, dtype=np.float32)
        offsets = np.asarray(recording.offsets_to_uV, dtype=np.float32)

        def send(samples, first, t_first, t_last):
            out.send(samples * gains + offsets, t_last)  # LSL stamps the last sample of a chunk
        return send, out
    raise StreamFormatError(f"{to}: replay sends to zmq:ADDRESS or lsl:NAME")


def replay(recording, to: str, speed: float = 1.0, chunk_ms: float = 1.0, loop: bool = False,
           duration: float | None = None, start_delay_s: float = 0.5, stop=None,
           consumer_timeout_s: float = 10.0) -> dict:
    """Send ``recording`` to ``to`` (``zmq:ADDRESS`` or ``lsl:NAME``) in chunks, ``speed`` x real time.

    Chunk k leaves when its last sample would have been acquired: at
    ``t0 + (first_sample + n) / (fs * speed)`` on the stream clock, whatever
    the previous sends cost, so the error never accumulates. ZeroMQ carries
    raw samples with ``gain_to_uV`` in the header; LSL carries float32 uV.
    Returns the pacing error (send time - due time) percentiles in ms and the counts.
    """
    fs = recording.sampling_rate
    chunk = max(1, int(round(chunk_ms * fs / 1000.0)))
    send, transport = _sender(recording, to, chunk)
    if hasattr(transport, "wait_for_consumers"):  # LSL knows when an inlet has opened the stream
        transport.wait_for_consumers(consumer_timeout_s)
    time.sleep(start_delay_s)  # let subscribers join before the first sample (ZeroMQ's slow joiner)
    total = recording.n_samples * (10**9 if loop else 1) if duration is None else int(duration * fs)
    errors = Distribution()  # constant memory: a looping replay runs for hours
    sent = 0
    t0 = now()
    try:
        while sent < total and not (stop is not None and stop.is_set()):
            for c in recording.iter_chunks(chunk, stop=min(recording.n_samples, total - sent)):
                if stop is not None and stop.is_set():
                    break
                n = c.n_samples
                due = t0 + (sent + n) / (fs * speed)
                wait_until(due)
                send(c.samples, sent, t0 + sent / (fs * speed), t0 + (sent + n - 1) / (fs * speed))
                errors.add_one(now() - due)
                sent += n
            if not loop:
                break
    finally:
        time.sleep(0.2)  # let the last messages leave before the socket closes
        transport.close()
    e = errors.percentiles(1000.0)
    stats = {"samples": sent, "chunks": errors.count, "dropped": transport.dropped,
             "pacing_error_ms": {q: e.get(q, 0.0) for q in ("p50", "p99", "max")}}
    log.info("replayed %d samples in %d chunks; pacing error p50 %.3f ms, p99 %.3f ms, max %.3f ms", sent,
             errors.count, *stats["pacing_error_ms"].values())
    return stats
