"""The signal path shared by training and the runtime: preprocess -> detect -> snippets.

:class:`FrontEnd` holds one stateful object per stage. Training streams a file
through it in chunks; the runtime streams live chunks through the very same
object, so offline and online spikes cannot differ.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .config import Config
from .detect import GradientDetector
from .dsp import Preprocessor, preprocess_array
from .errors import ConfigError
from .io.recording import Recording
from .snippets import SnippetExtractor
from .types import EVENT_DTYPE, SLOPE, Probe

log = logging.getLogger("rtsort.frontend")


@dataclass
class FrontEndOutput:
    """What one chunk produced.

    Attributes
    ----------
    events : ndarray of EVENT_DTYPE, shape (k,)
        Events whose snippets are complete.
    waveforms : ndarray of shape (k, T, K), float32 (uV), or None when snippets are off
    wait : ndarray of shape (k,), int64
        Samples from each trough to the end of the chunk that completed it.
    filtered : ndarray of shape (n_samples, n_channels), float32
        The preprocessed chunk (a view into a reused buffer: copy to keep it).
    """

    events: np.ndarray
    waveforms: np.ndarray | None
    wait: np.ndarray
    filtered: np.ndarray


class FrontEnd:
    """Preprocessing, detection and snippet extraction for one stream.

    Parameters
    ----------
    config : Config
    probe : Probe
    sampling_rate : float
    gains_to_uV, offsets_to_uV : float or ndarray of shape (n_channels,)
    noise_levels : ndarray of shape (2, n_channels), optional
        Detector noise levels (from a bundle); else call :meth:`calibrate`.
    snippets : bool
        Cut waveforms (off for detection-only work).
    motion : rtsort.motion.MotionSchedule or MotionTracker, optional
        Motion correction between preprocessing and detection (the tracker needs snippets: it locates spikes).
    """

    def __init__(self, config: Config, probe: Probe, sampling_rate: float, gains_to_uV=1.0,
                 offsets_to_uV=0.0, noise_levels=None, snippets: bool = True, motion=None):
        self.config = config
        self.probe = probe
        self.sampling_rate = float(sampling_rate)
        self.n_channels = probe.n_channels
        self.preprocessor = Preprocessor(config.preprocess, sampling_rate, self.n_channels, gains_to_uV,
                                         offsets_to_uV, probe.positions_um)
        self.detector = GradientDetector(config.detect, probe, sampling_rate, noise_levels)
        self.snippets = (
            SnippetExtractor(config.snippets, probe, sampling_rate, self.detector.event_ages)
            if snippets else None
        )
        self.motion = motion
        self._corrected = [np.zeros((0, self.n_channels), np.float32) for _ in range(3)]  # rotating outputs
        self._turn = 0
        self._next_sample = 0
        self.last_detect_ns = 0

    @classmethod
    def for_recording(cls, config: Config, recording: Recording, noise_levels=None, snippets: bool = True,
                      motion=None):
        return cls(config, recording.probe, recording.sampling_rate, recording.gains_to_uV,
                   recording.offsets_to_uV, noise_levels, snippets, motion)

    @property
    def next_sample(self) -> int:
        """The sample index the next chunk starts at."""
        return self._next_sample

    @property
    def noise_levels(self) -> np.ndarray | None:
        return self.detector.noise_levels

    def spike_mask(self, events: np.ndarray) -> np.ndarray:
        """Slope events deep enough (``detect.amp_threshold``) to be spikes by themselves; the others (shallower
        slope events, and troughs without a slope) are candidates."""
        depth = np.float32(self.config.detect.amp_threshold) * self.noise_levels[1][events["channel"]]
        return (np.abs(events["amplitude"]) >= depth) & (events["kind"] == SLOPE)

    @property
    def latency_floor_ms(self) -> float:
        """The algorithmic wait after a trough before its spike can leave (detector or snippet)."""
        wait = self.snippets.max_wait if self.snippets is not None else self.detector.max_event_age
        return wait * 1000.0 / self.sampling_rate

    def calibrate(self, recording: Recording) -> np.ndarray:
        """Estimate the detector's noise levels from the start of ``recording``.

        The window (``detect.noise_window_s``, at most the whole recording) is
        preprocessed by a fresh preprocessor, so the stream state is untouched.
        """
        n = min(recording.n_samples, int(self.config.detect.noise_window_s * recording.sampling_rate))
        if n < int(0.1 * recording.sampling_rate):
            raise ConfigError(
                f"{recording.source}: {recording.n_samples} samples; at least 0.1 s is needed to estimate noise"
            )
        filtered = preprocess_array(recording.get_traces(0, n), self.config.preprocess, recording.sampling_rate,
                                    recording.gains_to_uV, recording.offsets_to_uV, recording.probe.positions_um)
        noise = self.detector.calibrate(filtered)
        log.info("noise levels from %.1f s: median slope noise %.2f uV, voltage noise %.2f uV",
                 n / recording.sampling_rate, float(np.median(noise[0])), float(np.median(noise[1])))
        return noise

    def reset(self, first_sample: int = 0) -> None:
        self.preprocessor.reset()
        self.detector.reset(first_sample)
        if self.snippets is not None:
            self.snippets.reset(first_sample)
        if self.motion is not None:
            self.motion.reset(first_sample)
        self._next_sample = int(first_sample)

    def warmup(self) -> None:
        """Compile every kernel before the first real chunk."""
        self.preprocessor.warmup()
        self.detector.warmup()
        if self.snippets is not None:
            self.snippets.warmup()
        if self.motion is not None:
            self.motion.warmup()

    def process(self, samples: np.ndarray) -> FrontEndOutput:
        """Run one chunk of raw samples through every stage (the preprocessor checks its shape)."""
        return self.process_filtered(self.preprocessor.process(samples))

    def process_filtered(self, filtered: np.ndarray) -> FrontEndOutput:
        """Motion correction, detection and snippets for a chunk this front end's preprocessor has already filtered.

        With motion correction the chunk is cut at the displacement's step boundaries (fixed sample indices), so
        each piece is resampled with the displacement in force for it and the tracker updates at the same samples
        whatever the chunking. The output's ``filtered`` is then the corrected chunk (valid for two more chunks).
        """
        if self.motion is None:
            return self._detect(filtered)
        n = filtered.shape[0]
        buf = self._corrected[self._turn]
        if buf.shape[0] < n:
            buf = self._corrected[self._turn] = np.empty((max(n, 2 * buf.shape[0]), self.n_channels), np.float32)
        self._turn = (self._turn + 1) % 3
        out = buf[:n]
        first, step = self._next_sample, self.motion.step
        outs, a, t_detect = [], 0, 0
        while a < n:
            boundary = (first + a) // step * step + step
            b = min(n, boundary - first)
            self.motion.apply(filtered[a:b], out[a:b], first + a)
            piece = self._detect(out[a:b])
            t_detect += self.last_detect_ns
            if self.snippets is not None and piece.events.size:
                deep = self.spike_mask(piece.events)
                if deep.any():
                    self.motion.observe(piece.events[deep], piece.waveforms[deep], self.noise_levels, self.snippets)
            if first + b == boundary:
                self.motion.update(boundary)
            outs.append(piece)
            a = b
        self.last_detect_ns = t_detect
        if len(outs) == 1:
            o = outs[0]
            return FrontEndOutput(o.events, o.waveforms, o.wait, out)
        events = np.concatenate([o.events for o in outs])
        # waits count to the end of the whole chunk, which is when its events leave
        ends = np.cumsum([o.filtered.shape[0] for o in outs])
        wait = np.concatenate([o.wait + (n - e) for o, e in zip(outs, ends)])
        wf = None if self.snippets is None else np.concatenate([o.waveforms for o in outs])
        return FrontEndOutput(events, wf, wait, out)

    def _detect(self, filtered: np.ndarray) -> FrontEndOutput:
        first = self._next_sample
        t0 = time.perf_counter_ns()
        events = self.detector.process(filtered)
        self.last_detect_ns = time.perf_counter_ns() - t0
        self._next_sample += filtered.shape[0]
        if self.snippets is None:
            wait = (self._next_sample - 1 - events["sample_index"]).astype(np.int64)
            return FrontEndOutput(events, None, wait, filtered)
        ev, wf, wait = self.snippets.process(filtered, first, events)
        return FrontEndOutput(ev, wf, wait, filtered)


def filtered_chunks(preprocessor: Preprocessor, recording: Recording, chunk: int, stop: int | None = None):
    """Yield ``(n_samples, filtered)`` for consecutive chunks, preprocessing the next chunk on a worker thread.

    Offline work uses the machine's second core this way: the numba kernels
    release the GIL, so reading and filtering chunk i + 1 overlaps detection,
    encoding and assignment of chunk i. Three output buffers rotate, so a
    yielded array stays valid while the next one is filled (not longer).
    """
    stop = recording.n_samples if stop is None else min(stop, recording.n_samples)
    buffers = [np.empty((min(chunk, max(stop, 1)), recording.n_channels), dtype=np.float32) for _ in range(3)]

    def job(i: int, start: int):
        raw = recording.get_traces(start, min(start + chunk, stop))
        return raw.shape[0], preprocessor.process(raw, out=buffers[i % 3][: raw.shape[0]])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtsort-preprocess") as pool:
        starts = range(0, stop, chunk)
        pending = pool.submit(job, 0, starts[0]) if len(starts) else None
        for i in range(len(starts)):
            result = pending.result()
            pending = pool.submit(job, i + 1, starts[i + 1]) if i + 1 < len(starts) else None
            yield result


def _stream(fe: FrontEnd, recording: Recording, chunk_s: float, progress: bool, stop: int | None, desc: str):
    """Yield the front end's output for each chunk of ``recording`` (calibrated, warmed up)."""
    fe.warmup()
    chunk = max(1, int(chunk_s * recording.sampling_rate))
    total = recording.n_samples if stop is None else min(stop, recording.n_samples)
    with tqdm(total=total, desc=desc, unit="sample", unit_scale=True, disable=not progress, leave=False) as bar:
        for n, filtered in filtered_chunks(fe.preprocessor, recording, chunk, stop):
            yield fe.process_filtered(filtered)
            bar.update(n)


def _front_end(recording: Recording, config: Config, noise_levels, snippets: bool, motion=None) -> FrontEnd:
    fe = FrontEnd.for_recording(config, recording, noise_levels=noise_levels, snippets=snippets, motion=motion)
    if noise_levels is None:
        fe.calibrate(recording)
    if motion is not None:
        motion.reset(0)
    return fe


def corrected_chunks(preprocessor: Preprocessor, recording: Recording, chunk: int, schedule=None,
                     stop: int | None = None):
    """:func:`filtered_chunks` in the reference frame of a motion ``schedule`` (``rtsort.motion.MotionSchedule``),
    when one is given: each step's samples resampled with that step's displacement."""
    if schedule is None:
        yield from filtered_chunks(preprocessor, recording, chunk, stop)
        return
    schedule.reset(0)
    buffers = [np.empty((chunk, recording.n_channels), np.float32) for _ in range(3)]
    first = 0
    for i, (n, filtered) in enumerate(filtered_chunks(preprocessor, recording, chunk, stop)):
        out = buffers[i % 3][:n]
        a = 0
        while a < n:
            boundary = (first + a) // schedule.step * schedule.step + schedule.step
            b = min(n, boundary - first)
            schedule.apply(filtered[a:b], out[a:b], first + a)
            if first + b == boundary:
                schedule.update(boundary)
            a = b
        first += n
        yield n, out


def detect_recording(recording: Recording, config: Config, chunk_s: float = 1.0, progress: bool = True,
                     noise_levels=None, stop: int | None = None, motion=None) -> tuple[np.ndarray, np.ndarray]:
    """Detect every spike of a recording through the streaming front end (candidates need a bundle's templates).

    Returns
    -------
    events : ndarray of EVENT_DTYPE
    noise_levels : ndarray of shape (2, n_channels), float32
    """
    fe = _front_end(recording, config, noise_levels, snippets=False, motion=motion)
    pieces = [out.events[fe.spike_mask(out.events)] for out in _stream(fe, recording, chunk_s, progress, stop,
                                                                       "detect")]
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=EVENT_DTYPE)), fe.noise_levels


def snippets_recording(recording: Recording, config: Config, chunk_s: float = 1.0, progress: bool = True,
                       noise_levels=None, stop: int | None = None, select=None, desc: str = "detect + snippets",
                       motion=None):
    """Detect every event of a recording (candidates too) and cut its snippet, through the streaming front end.

    ``select(front_end, events, waveforms) -> bool mask``, applied chunk by
    chunk, keeps only some events (so memory holds only those snippets).

    Returns
    -------
    events : ndarray of EVENT_DTYPE, shape (k,)
    waveforms : ndarray of shape (k, T, K), float32 uV
    front_end : FrontEnd
        Its ``noise_levels`` and ``snippets.channel_index`` / ``relative_positions`` describe the snippets.
    """
    fe = _front_end(recording, config, noise_levels, snippets=True, motion=motion)
    ev, wf = [], []
    for out in _stream(fe, recording, chunk_s, progress, stop, desc):
        if select is None:
            ev.append(out.events)
            wf.append(out.waveforms)
        elif out.events.size:
            m = select(fe, out.events, out.waveforms)
            ev.append(out.events[m])
            wf.append(out.waveforms[m])
    shape = (0, fe.snippets.n_samples, fe.snippets.k_channels)
    events = np.concatenate(ev) if ev else np.zeros(0, dtype=EVENT_DTYPE)
    waveforms = np.concatenate(wf) if wf else np.zeros(shape, dtype=np.float32)
    return events, waveforms, fe
