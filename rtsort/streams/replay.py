"""Publish a recording as a live stream, paced against an absolute clock so it never drifts."""

from __future__ import annotations

import logging
import time

import numpy as np

from ..errors import StreamFormatError
from .zmq import ZmqPublisher, samples_message

log = logging.getLogger("rtsort.streams.replay")


def now() -> float:
    """The stream clock: ``pylsl.local_clock()`` (CLOCK_MONOTONIC on Linux), or time.monotonic without pylsl."""
    try:
        from pylsl import local_clock
    except ImportError:  # pragma: no cover
        return time.monotonic()
    return local_clock()


def wait_until(t: float) -> None:
    """Sleep to within ~0.3 ms of ``t``, then spin (sleep alone overshoots by up to a scheduler tick)."""
    while True:
        left = t - now()
        if left <= 0:
            return
        if left > 0.001:
            time.sleep(left - 0.0007)


def replay(recording, to: str, speed: float = 1.0, chunk_ms: float = 1.0, loop: bool = False,
           duration: float | None = None, start_delay_s: float = 0.5, stop=None) -> dict:
    """Send ``recording`` to ``to`` (``zmq:ADDRESS``) in chunks of ``chunk_ms``, ``speed`` x real time.

    Chunk k leaves when its last sample would have been acquired: at
    ``t0 + (first_sample + n) / (fs * speed)`` on the stream clock, whatever
    the previous sends cost, so the error never accumulates. Returns the
    pacing error (send time - due time) percentiles in ms and the counts.
    """
    if not to.startswith("zmq:"):
        raise StreamFormatError(f"{to}: replay sends to zmq:ADDRESS (LSL arrives with the runtime's LSL support)")
    fs = recording.sampling_rate
    chunk = max(1, int(round(chunk_ms * fs / 1000.0)))
    pub = ZmqPublisher(to)
    time.sleep(start_delay_s)  # let subscribers join before the first sample (ZeroMQ's slow joiner)
    total = recording.n_samples if duration is None else int(duration * fs)
    errors = []
    sent = 0
    t0 = now()
    try:
        while sent < total:
            for c in recording.iter_chunks(chunk, stop=min(recording.n_samples, total - sent) if not loop
                                           else recording.n_samples):
                if sent >= total or (stop is not None and stop.is_set()):
                    break
                samples = c.samples[: total - sent]
                due = t0 + (sent + samples.shape[0]) / (fs * speed)
                wait_until(due)
                pub.send(samples_message(samples, sent, fs, t0 + sent / (fs * speed),
                                         gain_to_uV=float(np.mean(recording.gains_to_uV))))
                errors.append(now() - due)
                sent += samples.shape[0]
            if not loop or (stop is not None and stop.is_set()):
                break
    finally:
        time.sleep(0.2)  # let the last messages leave before the socket closes
        pub.close()
    e = np.asarray(errors) * 1000.0
    stats = {"samples": sent, "chunks": len(errors), "dropped": pub.dropped,
             "pacing_error_ms": {q: float(np.percentile(e, p)) if e.size else 0.0
                                 for q, p in (("p50", 50), ("p99", 99), ("max", 100))}}
    log.info("replayed %d samples in %d chunks; pacing error p50 %.3f ms, p99 %.3f ms, max %.3f ms", sent,
             len(errors), *stats["pacing_error_ms"].values())
    return stats
