"""Lab Streaming Layer: a samples inlet (source), a marker outlet (sink), and an outlet for replay.

Input: any regular-rate numeric stream selected by name, whose channel count
and rate match the bundle (checked at start, both values in the message).
Float streams are taken as microvolts; integer streams are scaled by the
bundle's training gain. Sample indices count from the first sample received;
a stream that vanishes is waited for (the inlet recovers by itself) and the
samples missed while it was gone, from the LSL timestamps, are reported as a
gap. Output: an irregular-rate ``Markers`` outlet of int32 channels
``[unit, peak_channel, latency_us, confidence_permille, flags]`` (:data:`MARKER_CHANNELS`), one sample per spike,
stamped with the LSL time of the spike's trough, so a consumer measures
latency as ``local_clock() - t``; ``latency_us`` is rtsort's own (trough to
emission), ``confidence_permille`` the label's confidence x 1000 (-1: none)
and ``flags`` the bits of ``rtsort.types`` (1 peeled, 2 unencoded, 4 correction).
``lsl:NAME?format=string`` gives a 1-channel ``cf_string`` Markers outlet
instead, the unit id as text (:class:`LslStringMarkerSink`).
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import BundleError, StreamFormatError, StreamLostError
from ..types import Chunk

log = logging.getLogger("rtsort.streams.lsl")


def _formats():
    import pylsl

    return {pylsl.cf_int16: np.int16, pylsl.cf_int32: np.int32, pylsl.cf_float32: np.float32,
            pylsl.cf_double64: np.float64}


class LslSource:
    def __init__(self, name: str, n_channels: int, sampling_rate: float, resolve_timeout: float = 5.0,
                 timeout_s: float = 0.2, max_chunk: int | None = None, gain_to_uV: float = 1.0):
        import pylsl

        self.name = name
        infos = pylsl.resolve_byprop("name", name, minimum=1, timeout=resolve_timeout)
        if not infos:
            raise StreamLostError(f"lsl:{name}: no LSL stream of that name found within {resolve_timeout:g} s")
        info = infos[0]
        c, fs, fmt = info.channel_count(), info.nominal_srate(), info.channel_format()
        if c != n_channels:
            raise BundleError(f"lsl:{name} has {c} channels but the bundle expects {n_channels}")
        if abs(fs - sampling_rate) > 1e-6 * sampling_rate:
            raise BundleError(f"lsl:{name} is sampled at {fs:g} Hz but the bundle expects {sampling_rate:g} Hz")
        formats = _formats()
        if fmt not in formats:
            raise StreamFormatError(f"lsl:{name}: channel format {fmt} is not numeric (int16/int32/float32/double64)")
        self.dtype = formats[fmt]
        self.sampling_rate = float(fs)
        self.gain_to_uV = 1.0 if np.dtype(self.dtype).kind == "f" else float(gain_to_uV)
        self.inlet = pylsl.StreamInlet(info, max_buflen=60, recover=True, processing_flags=pylsl.proc_clocksync)
        # the first clock-sync estimate takes up to a second: get it before the stream opens, not on the first
        # pull (the samples of that second would queue up and leave late)
        self.inlet.time_correction(timeout=resolve_timeout)
        self.inlet.open_stream(timeout=resolve_timeout)
        self.timeout_s = timeout_s
        self.max_chunk = int(max_chunk or max(1, round(0.05 * fs)))
        self._buf = np.empty((self.max_chunk, c), dtype=self.dtype)
        self.next_sample = 0
        self.last_ts = None
        self.gaps = []
        self.malformed = {}
        self._lost = False
        self._gap_tolerance = max(3, int(0.002 * fs))

    def read(self) -> Chunk | None:
        import pylsl

        try:
            samples, ts = self.inlet.pull_chunk(timeout=self.timeout_s, max_samples=self.max_chunk,
                                                dest_obj=self._buf, as_numpy=True, min_samples=1)
        except pylsl.LostError:
            if not self._lost:
                log.warning("lsl:%s: stream lost; waiting for it to come back", self.name)
            self._lost = True
            return None
        n = len(ts)
        if n == 0:
            return None
        if self._lost:
            log.warning("lsl:%s: stream is back", self.name)
            self._lost = False
        if self.last_ts is not None:
            missing = int(round((ts[0] - self.last_ts) * self.sampling_rate)) - 1
            if missing > self._gap_tolerance:
                self.gaps.append((self.next_sample, self.next_sample + missing))
                log.warning("lsl:%s: %d samples (%.3f s) missing before sample %d", self.name, missing,
                            missing / self.sampling_rate, self.next_sample + missing)
                self.next_sample += missing
        first = self.next_sample
        self.next_sample += n
        self.last_ts = float(ts[-1])
        # samples[0]'s time as the last sample's stamp says it: a pull may join pushes of a stream sent faster
        # than real time (a replay at --speed 3), whose first stamp, counted on at the sampling rate, would put
        # the last sample in the future
        return Chunk(samples, first_sample=first, timestamp=float(ts[-1]) - (n - 1) / self.sampling_rate)

    def close(self) -> None:
        self.inlet.close_stream()
        del self.inlet


MARKER_CHANNELS = ("unit", "peak_channel", "latency_us", "confidence_permille", "flags")


def _thousandths(values: np.ndarray) -> np.ndarray:
    """x 1000, rounded, never below 0 (a clock read a microsecond early is 0); -1 where unknown (NaN)."""
    return np.where(np.isfinite(values), np.maximum(np.round(np.nan_to_num(values) * 1000.0), 0.0), -1)


class LslMarkerSink:
    def __init__(self, name: str):
        import pylsl

        info = pylsl.StreamInfo(name, "Markers", len(MARKER_CHANNELS), pylsl.IRREGULAR_RATE, pylsl.cf_int32,
                                f"rtsort-markers-{name}")
        info.desc().append_child_value("producer", "rtsort")
        chans = info.desc().append_child("channels")
        for label in MARKER_CHANNELS:
            chans.append_child("channel").append_child_value("label", label)
        self.outlet = pylsl.StreamOutlet(info)

    def write(self, spikes: np.ndarray, timestamps: np.ndarray, latency_ms: np.ndarray | None = None) -> None:
        x = np.empty((spikes.size, len(MARKER_CHANNELS)), dtype=np.int32)
        x[:, 0] = spikes["unit"]
        x[:, 1] = spikes["channel"]
        x[:, 2] = -1 if latency_ms is None else _thousandths(latency_ms)
        x[:, 3] = _thousandths(spikes["confidence"])
        x[:, 4] = spikes["flags"]
        self.outlet.push_chunk(x, timestamps.tolist())

    def close(self) -> None:
        del self.outlet


class LslStringMarkerSink:
    """``lsl:NAME?format=string``: a 1-channel ``cf_string`` Markers outlet at irregular rate, the unit id as text.

    One marker per spike (``"-1"``: unassigned), stamped with the LSL time of
    the trough. The source id is stable across runs (``rtsort-markers-NAME-
    string``), so a consumer such as the Open Ephys LSL Inlet or LabRecorder
    reconnects to a restarted rtsort by itself.
    """

    def __init__(self, name: str):
        import pylsl

        info = pylsl.StreamInfo(name, "Markers", 1, pylsl.IRREGULAR_RATE, pylsl.cf_string,
                                f"rtsort-markers-{name}-string")
        info.desc().append_child_value("producer", "rtsort")
        info.desc().append_child("channels").append_child("channel").append_child_value("label", "unit")
        self.outlet = pylsl.StreamOutlet(info)

    def write(self, spikes: np.ndarray, timestamps: np.ndarray, latency_ms: np.ndarray | None = None) -> None:
        if spikes.size:
            self.outlet.push_chunk([str(u) for u in spikes["unit"].tolist()], np.asarray(timestamps, float).tolist())

    def close(self) -> None:
        del self.outlet


class LslSamplesOutlet:
    """A regular-rate float32 outlet (microvolts) that replays a recording."""

    def __init__(self, name: str, n_channels: int, sampling_rate: float, chunk: int):
        import pylsl

        info = pylsl.StreamInfo(name, "ExtracellularVoltage", n_channels, sampling_rate, pylsl.cf_float32,
                                f"rtsort-replay-{name}")
        self.outlet = pylsl.StreamOutlet(info, chunk_size=chunk)
        self.dropped = 0

    def wait_for_consumers(self, timeout: float) -> bool:
        return self.outlet.wait_for_consumers(timeout)

    def send(self, samples_uV: np.ndarray, last_timestamp: float) -> None:
        self.outlet.push_chunk(np.ascontiguousarray(samples_uV, dtype=np.float32), last_timestamp)

    def close(self) -> None:
        del self.outlet
