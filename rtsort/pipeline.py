"""The online pipeline: raw chunks in, labelled spikes out. No torch here.

One :class:`Pipeline` per stream: the front end (preprocess -> detect ->
snippets, the very objects training used), then every snippet completed by a
chunk is labelled. A spike (at least ``detect.amp_threshold`` deep) is
encoded (one onnxruntime call per chunk), its nearest centroids short-list
units, and the unit whose template fits it best takes it (or -1). A shallower
candidate is not encoded: the units peaking near it compete by template fit,
and it leaves only when one claims it.
``rtsort sort`` runs the same object over a file in large chunks; chunk
invariance makes its spikes and labels the same as a live stream's.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from .assign import LatePhase, make_assigner, unit_purity
from .bundle import Bundle, load_bundle
from .dsp import HEALTH_STRIDE_S, noisy_channels
from .errors import BundleError, ConfigError
from .features import Encoder, Featurizer
from .frontend import FrontEnd, filtered_chunks
from .motion import MotionTracker, motion_enabled
from .peel import Peeler
from .stats import Distribution
from .types import FLAG_PEELED, FLAG_UNENCODED, SPIKE_DTYPE, TAIL

log = logging.getLogger("rtsort.pipeline")

STAGES = ("preprocess", "detect", "snippets", "encode", "assign", "peel")
_NO_SPIKES = np.zeros(0, dtype=SPIKE_DTYPE)
_NO_SPIKES.flags.writeable = False  # shared by every chunk without spikes


def labelled(events: np.ndarray, unit: np.ndarray, distance, confidence=np.nan, flags: int = 0) -> np.ndarray:
    out = np.empty(events.size, dtype=SPIKE_DTYPE)
    out["sample_index"] = events["sample_index"]
    out["channel"] = events["channel"]
    out["amplitude"] = events["amplitude"]
    out["unit"] = unit
    out["distance"] = distance
    out["confidence"] = confidence
    out["flags"] = flags
    return out


def make_featurizer(bundle: Bundle, front: FrontEnd, threads: int = 1) -> Featurizer:
    """The bundle's encoder and feature scaling over the front end's snippet layout."""
    encoder = Encoder(bundle.encoder_path, threads)
    want = (front.snippets.n_samples, front.snippets.k_channels)
    if tuple(encoder.input_shape) != want:
        raise BundleError(f"{bundle.encoder_path}: encoder takes snippets of {tuple(encoder.input_shape)} "
                          f"(samples, channels) but the bundle's snippet parameters give {want}")
    if encoder.latent_dim != bundle.features["latent_dim"]:
        raise BundleError(f"{bundle.encoder_path}: encoder gives {encoder.latent_dim} features, the manifest "
                          f"says {bundle.features['latent_dim']}")
    return Featurizer(encoder, front.snippets.channel_index, front.snippets.relative_positions,
                      bundle.probe.positions_um, bundle.noise_levels[1], bundle.features["latent_scale"],
                      bundle.features["position_scale_um"])


def motion_tracker(bundle: Bundle, front: FrontEnd):
    """The runtime's motion tracker for a bundle (``rtsort.motion``), or None: motion correction off for its probe,
    or a bundle trained without it (no reference)."""
    cfg = bundle.config.motion
    if not motion_enabled(cfg, bundle.probe):
        return None
    if bundle.motion_reference is None:
        log.info("%s: no motion reference in the bundle: motion correction off", bundle.path)
        return None
    try:
        return MotionTracker(bundle.probe, bundle.sampling_rate, cfg, bundle.motion_reference,
                             front.snippets.max_wait, noise_uV=bundle.noise_levels[1])
    except ValueError as exc:
        raise BundleError(f"{bundle.path}: {exc}") from None


def late_phase(front: FrontEnd, templates: np.ndarray, n_before: int, enabled: bool = True) -> LatePhase:
    """The late-phase rule (``rtsort.assign.LatePhase``) with a bundle's templates, for a front end's detector
    thresholds and snippet timing."""
    cfg = front.config.detect
    noise = front.noise_levels[1]
    lowest = min(cfg.amp_threshold, cfg.candidate_threshold) if cfg.candidate_threshold > 0 else cfg.amp_threshold
    return LatePhase(templates, n_before, cfg.amp_threshold * noise, lowest * noise, front.snippets.due_spread,
                     enabled)


def spikes_kept(deep: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Which labelled events leave: the spikes (``deep``, from ``FrontEnd.spike_mask``) but those nearest a
    tail centroid (a bigger spike's late phase, seen again), and the candidates a unit's template claimed."""
    return (deep & (unit != TAIL)) | (unit >= 0)


class Pipeline:
    """Sort one stream with a bundle.

    Parameters
    ----------
    bundle : Bundle or path
    gains_to_uV, offsets_to_uV : float or ndarray (n_channels,)
        Conversion of the incoming samples to uV.
    threads : int
        onnxruntime intra-op threads (1 keeps the other core for I/O).
    track_rate : float, optional
        Centroid tracking for drift (``[assign] track_rate``); None takes the bundle's.
    front : FrontEnd, optional
        Another pipeline's front end to share (``rtsort.swap``: a curated bundle taking over a live stream);
        its preprocessing, detection, snippets and motion correction must be this bundle's
        (:func:`rtsort.swap.differences`). None builds the bundle's own.
    """

    def __init__(self, bundle, gains_to_uV=1.0, offsets_to_uV=0.0, threads: int = 1,
                 track_rate: float | None = None, front: FrontEnd | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        b = self.bundle
        if front is None:
            front = FrontEnd(b.config, b.probe, b.sampling_rate, gains_to_uV, offsets_to_uV,
                             noise_levels=b.noise_levels)
            front.motion = motion_tracker(b, front)
        self.front = front
        self.featurizer = make_featurizer(b, self.front, threads)
        n = self.front.snippets.n_samples
        if b.templates.shape[1] < n:
            raise BundleError(f"{b.path}: templates have {b.templates.shape[1]} samples, fewer than the bundle's "
                              f"snippets ({n})")
        # the fits see the snippet's span; peeling subtracts the whole template (the late phase too)
        self.assigner = make_assigner(b.centroids, b.centroid_unit, b.centroid_radius, b.templates[:, :n],
                                      b.noise_levels[1], self.front.snippets.channel_index, b.config.assign,
                                      track_rate)
        self.peeler = Peeler(self.front, b.templates, self.assigner.matcher) \
            if b.config.assign.peel and self.assigner.matcher is not None else None
        self.late_phase = late_phase(self.front, b.templates, int(b.features["n_before"]),
                                     b.config.assign.late_phase_residual > 0)
        # a label's confidence: the template posterior (rtsort.assign) times the unit's purity; index -1 (no
        # unit, NaN confidence) reads the appended 1
        self.purity = np.append(unit_purity(b.units), np.float32(1.0))
        self.n_spikes = 0
        self.n_unassigned = 0
        self.n_skipped = 0  # detected but not encoded (overload)
        self.n_candidates_dropped = 0  # shallow events no template claimed: not spikes
        self.n_candidates_claimed = 0  # shallow events a template claimed: spikes (in n_spikes)
        self.n_tails = 0  # a bigger spike's late phase, not spikes: nearest a tail centroid, or LatePhase's
        self.last_peeled = 0  # how many of the last chunk's spikes (its last ones) the peeler found
        self.stage_ns = np.zeros(len(STAGES), dtype=np.int64)  # the last chunk's cost per stage

    def warmup(self, front: bool = True) -> None:
        """Compile the kernels and run the encoder once, so the first chunk is not slow. ``front=False`` leaves
        the front end alone (a shared one, busy in another thread)."""
        if front:
            self.front.warmup()
        s = self.front.snippets
        ch = np.zeros(2, np.int64)
        deep = np.array([True, False])  # a spike and a candidate: both paths compiled
        features, xn = self.featurizer.encode(np.zeros((2, s.n_samples, s.k_channels), np.float32), ch, deep)
        self.assigner.copy().label(features, xn, ch, deep)  # a scratch copy: warming must not move tracked centroids
        self.late_phase.warmup()
        if self.peeler is not None:
            self.peeler.warmup()

    def reset(self, first_sample: int = 0) -> None:
        self.front.reset(first_sample)
        self.late_phase.reset()
        if self.peeler is not None:
            self.peeler.reset(first_sample)

    def process(self, samples: np.ndarray, encode: bool = True) -> np.ndarray:
        """One chunk of raw samples (n, C) -> the spikes it completed (SPIKE_DTYPE), labelled.

        ``encode=False`` is the overload path: the spikes are detected and
        emitted, unlabelled (-1), without the encoder's cost; candidates,
        which only a template fit makes spikes, are dropped.
        """
        return self.process_filtered(self.preprocess(samples), encode)

    def preprocess(self, samples: np.ndarray) -> np.ndarray:
        """Filter one chunk of raw samples (timed as the first stage); the result is also ``last_filtered``,
        valid until the next chunk."""
        t0 = time.perf_counter_ns()
        filtered = self.last_filtered = self.front.preprocessor.process(samples)
        self.stage_ns[0] = time.perf_counter_ns() - t0
        return filtered

    def process_filtered(self, filtered: np.ndarray, encode: bool = True) -> np.ndarray:
        """The stages after preprocessing, for a chunk this pipeline's preprocessor filtered."""
        return self.peel(*self.first_pass(filtered, encode), encode)

    def first_pass(self, filtered: np.ndarray, encode: bool = True):
        """Correct motion, detect, encode and label a filtered chunk: (the chunk in the bundle's frame, its spikes,
        their snippets in noise units or None, the events dropped as tails), :meth:`peel`'s arguments."""
        return self.label_pass(self.front_pass(filtered), encode)

    def front_pass(self, filtered: np.ndarray):
        """Correct motion, detect and cut snippets: the front end's output for a filtered chunk."""
        t1 = time.perf_counter_ns()
        out = self.front.process_filtered(filtered)
        self.stage_ns[1] = self.front.last_detect_ns
        self.stage_ns[2] = time.perf_counter_ns() - t1 - self.stage_ns[1]
        return out

    def label_pass(self, out, encode: bool = True):
        """Encode and label a front end output's events (:meth:`first_pass` after :meth:`front_pass`)."""
        t2 = time.perf_counter_ns()
        ev = out.events
        st = self.stage_ns
        st[3] = st[4] = 0
        xn = None
        tails = ev[:0]
        if ev.size == 0:
            spikes = _NO_SPIKES
        elif not encode:  # candidates need a template to be spikes: only the deep events leave
            ev = ev[self.front.spike_mask(ev)]
            self.n_skipped += ev.size
            spikes = labelled(ev, np.full(ev.size, -1, np.int32), np.nan, np.nan, FLAG_UNENCODED)
        else:
            deep = self.front.spike_mask(ev)
            features, xn = self.featurizer.encode(out.waveforms, ev["channel"], deep)
            t3 = time.perf_counter_ns()
            residual = np.empty(ev.size, np.float64)
            conf = np.empty(ev.size, np.float32)
            unit, dist = self.assigner.label(features, xn, ev["channel"], deep, residual, conf)
            keep = spikes_kept(deep, unit)
            late = self.late_phase(ev, unit, keep, deep)
            if not keep.all() or not deep.all() or late.any():
                tail = (deep & ~keep) | late
                keep &= ~late
                n_claimed = int(np.count_nonzero(keep & ~deep))
                self.n_candidates_claimed += n_claimed
                self.n_candidates_dropped += int(np.count_nonzero(~deep & ~late)) - n_claimed
                self.n_tails += int(np.count_nonzero(tail))
                tails = ev[tail]
                ev, unit, dist, xn, conf = ev[keep], unit[keep], dist[keep], xn[keep], conf[keep]
            st[3] = t3 - t2
            st[4] = time.perf_counter_ns() - t3
            spikes = labelled(ev, unit, dist, conf * self.purity[unit]) if ev.size else _NO_SPIKES
        return out.filtered, spikes, xn, tails

    def peel(self, filtered: np.ndarray, spikes: np.ndarray, xn, tails: np.ndarray,
             encode: bool = True) -> np.ndarray:
        """The first pass's spikes of a chunk, and the peeled ones (``rtsort.peel``) after them.

        Chunks go through :meth:`first_pass` and then this in stream order;
        this may run for chunk i while :meth:`first_pass` runs for chunk i + 1.
        """
        st = self.stage_ns
        st[5] = 0
        self.last_peeled = 0
        if self.peeler is not None and not encode:
            # overload: nothing was labelled, so nothing would be subtracted and the second pass would only detect
            # the first pass's spikes again; it is skipped, and starts afresh after the overload, as after a gap
            self.peeler.skip(filtered.shape[0])
        elif self.peeler is not None:  # fed every other chunk: the residual stream must stay whole
            t5 = time.perf_counter_ns()
            pev, punit, pconf = self.peeler.process(filtered, spikes, xn, tails)
            if pev.size:  # at the end of the chunk's spikes, a little later than the others
                spikes = np.concatenate([spikes, labelled(pev, punit, np.nan, pconf * self.purity[punit], FLAG_PEELED)])
                self.last_peeled = pev.size
            st[5] = time.perf_counter_ns() - t5
        self.n_spikes += spikes.size
        self.n_unassigned += int(np.count_nonzero(spikes["unit"] < 0))
        return spikes


def sort_recording(recording, bundle, chunk_s: float = 1.0, progress: bool = True, threads: int = 1,
                   track_rate: float | None = None):
    """Sort a whole recording through :class:`Pipeline`; return (spikes, seconds of compute)."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    bundle.check_recording(recording)
    pipe = Pipeline(bundle, recording.gains_to_uV, recording.offsets_to_uV, threads, track_rate)
    pipe.warmup()
    chunk = max(1, int(chunk_s * recording.sampling_rate))
    pieces = []
    t0 = time.perf_counter()
    # peeling chunk i runs on a worker thread while the main thread labels chunk i + 1 (numba releases the GIL);
    # a filtered chunk stays valid until two more have been yielded (filtered_chunks), so it outlives its peel
    with tqdm(total=recording.n_samples, desc="sort", unit="sample", unit_scale=True, disable=not progress,
              leave=False) as bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtsort-peel") as pool:
        peeling = None
        for n, filtered in filtered_chunks(pipe.front.preprocessor, recording, chunk):
            first = pipe.first_pass(filtered)
            if peeling is not None:
                pieces.append(peeling.result())
            peeling = pool.submit(pipe.peel, *first)
            bar.update(n)
        if peeling is not None:
            pieces.append(peeling.result())
    dt = time.perf_counter() - t0
    spikes = np.concatenate(pieces) if pieces else np.zeros(0, dtype=SPIKE_DTYPE)
    # in time order: peeled spikes leave a little later than the others (the stream's order depends on chunking)
    spikes = spikes[np.lexsort((spikes["channel"], spikes["sample_index"]))]
    log.info("sorted %.1f s of %d channels in %.1f s (%.1fx real time): %d spikes, %d unassigned; %d tails of "
             "bigger spikes dropped", recording.duration_s, recording.n_channels, dt,
             recording.duration_s / max(dt, 1e-9), spikes.size, int(np.sum(spikes["unit"] < 0)), pipe.n_tails)
    return spikes, dt


def raise_priority(priority: int = 10) -> bool:
    """Ask the OS to schedule this process first (SCHED_FIFO at ``priority``); False, with a warning, if refused.

    For closed-loop runs on a busy machine: the scheduler then runs the sorter
    as soon as a chunk arrives instead of after whatever else holds the core.
    The run loop blocks on its source between chunks, so it never starves the
    machine. Needs root, CAP_SYS_NICE or an ``rtprio`` limit (limits.conf).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        log.info("real-time scheduling: SCHED_FIFO priority %d", priority)
        return True
    except (AttributeError, PermissionError, OSError) as exc:
        log.warning("real-time scheduling refused (%s); running at normal priority. Grant it with "
                    "'setcap cap_sys_nice+ep' on the interpreter or an rtprio limit in limits.conf", exc)
        return False


def pin_to_cpu(cpu: int, now: bool = True) -> None:
    """Run the calling thread on CPU ``cpu`` alone (Linux): the scheduler never moves the hot loop, so its caches
    stay warm, and other work can be kept off that core (``taskset``, ``isolcpus``). Threads started afterwards by
    this one inherit the pin. ``now=False`` only checks that the CPU is one this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    if cpu not in allowed:
        raise ConfigError(f"--cpu {cpu}: this process may run on CPUs {allowed} only")
    if now:
        os.sched_setaffinity(0, {cpu})  # pid 0: the calling thread
        log.info("hot loop pinned to CPU %d", cpu)


#: a live run keeps Python's garbage collector out of the hot loop: objects made before the first chunk are frozen
#: (never scanned again), automatic collection is off, and right after a chunk's spikes have left the young
#: generations are collected every GC_EVERY_S of samples and the whole heap every GC_FULL_EVERY_S (both timed in
#: the statistics' ``gc_ms``). The collector is process-wide: a run in a thread holds it off for the whole
#: program until the run ends, then gives back what it found (a freeze made before the run stays).
GC_EVERY_S = 1.0
GC_FULL_EVERY_S = 60.0


class SignalHealth:
    """What a live stream's samples did wrong, counted per channel as they pass (the run's statistics).

    - saturated: raw samples at an integer type's limits; in a float stream, finite samples at or beyond the
      int16 full scale of the bundle's gain (``32767 x gain_to_uV`` uV);
    - non-finite (NaN, inf): counted by the preprocessor, which filters 0 uV in their place so that the filter
      state stays finite;
    - flat: a channel whose raw samples did not change over a window of ``WINDOW_S``;
    - noisy: a channel whose filtered noise over a window (MAD / 0.6745, as the bundle's noise levels) is more
      than ``rtsort.dsp.NOISY_X`` (3) times its noise level in the bundle.

    Windows see one sample every ``STRIDE_S`` (200 per window): the median
    ignores a short burst (a saturated stretch, a spike train). Flat and noisy
    are counted in windows (seconds), with a warning when a channel turns bad
    and when it recovers. Cost: two reductions and a strided copy per chunk
    (about 10 us at 384 channels), and about 1 ms per window.
    """

    STRIDE_S = HEALTH_STRIDE_S
    WINDOW_S = 1.0

    def __init__(self, noise_uV: np.ndarray, sampling_rate: float, rail_uV: float):
        c = noise_uV.size
        self.noise_uV = np.asarray(noise_uV, np.float32)
        self.stride = max(1, int(round(self.STRIDE_S * sampling_rate)))
        self.rows = max(10, int(round(self.WINDOW_S / self.STRIDE_S)))
        self.rail_uV = float(rail_uV)
        self._raw = np.zeros((self.rows, c), np.float32)
        self._filtered = np.zeros((self.rows, c), np.float32)
        self._n = 0
        self._limits = None
        self.saturated = np.zeros(c, np.int64)
        self.flat = np.zeros(c, bool)  # in the last window
        self.noisy = np.zeros(c, bool)
        self.flat_s = np.zeros(c, np.int64)  # windows flagged
        self.noisy_s = np.zeros(c, np.int64)

    def set_scale(self, dtype, gains_to_uV) -> None:
        """The raw samples' type and gain (known with the first chunk): where saturation starts."""
        dtype = np.dtype(dtype)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            self._limits = (True, info.min, info.max)
        else:
            gain = np.abs(np.broadcast_to(np.asarray(gains_to_uV, np.float64), self.noise_uV.shape))
            self._limits = (False, None, (self.rail_uV / np.maximum(gain, 1e-30)).astype(np.float32))

    def update(self, first_sample: int, raw: np.ndarray, filtered: np.ndarray) -> None:
        integer, lo, hi = self._limits
        n = raw.shape[0]
        if n == 0:
            return
        if integer:
            if raw.min() <= lo or raw.max() >= hi:
                self.saturated += np.count_nonzero((raw <= lo) | (raw >= hi), axis=0)
        else:
            top = float(np.abs(raw).max())  # NaN or inf: look closer too
            if not top < float(hi.min()):
                with np.errstate(invalid="ignore"):
                    self.saturated += np.count_nonzero((np.abs(raw) >= hi) & np.isfinite(raw), axis=0)
        i = (-first_sample) % self.stride
        r, f = raw[i::self.stride], filtered[i::self.stride]
        while r.shape[0]:  # a long chunk may end one window and start the next
            k = min(r.shape[0], self.rows - self._n)
            self._raw[self._n:self._n + k] = r[:k]
            self._filtered[self._n:self._n + k] = f[:k]
            self._n += k
            r, f = r[k:], f[k:]
            if self._n == self.rows:
                self._window()
                self._n = 0

    def _window(self) -> None:
        flat = self._raw.max(axis=0) == self._raw.min(axis=0)  # NaN compares unequal: not flat
        noisy = noisy_channels(self._filtered, self.noise_uV)
        for now, before, what in ((flat, self.flat, "flat"), (noisy, self.noisy, "noisy")):
            for c in np.flatnonzero(now & ~before).tolist():
                log.warning("channel %d is %s", c, what)
            for c in np.flatnonzero(before & ~now).tolist():
                log.warning("channel %d is no longer %s", c, what)
        self.flat, self.noisy = flat, noisy
        self.flat_s += flat
        self.noisy_s += noisy

    def stats(self) -> dict:
        def per_channel(a):
            return {str(c): int(a[c]) for c in np.flatnonzero(a).tolist()}
        return {"saturated_samples": int(self.saturated.sum()), "saturated_channels": per_channel(self.saturated),
                "flat_channel_s": per_channel(self.flat_s), "noisy_channel_s": per_channel(self.noisy_s)}


def run_stream(bundle, source: str, sinks=(), duration: float | None = None, idle_timeout: float | None = None,
               chunk_ms: float = 1.0, speed: float | None = None, threads: int = 1, stop=None,
               resolve_timeout: float = 5.0, max_lag_ms: float | None = 50.0,
               track_rate: float | None = None, report=None, report_every_s: float = 60.0,
               watch_bundle=None, cpu: int | None = None) -> dict:
    """Sort a stream until it ends, ``duration`` seconds of samples, ``idle_timeout`` without data, or ``stop``.

    Overload policy: when a live chunk arrives more than ``max_lag_ms`` after
    its last sample was taken (the pipeline has fallen behind), its spikes are
    detected and emitted unlabelled (-1) without encoding, and counted as
    ``skipped_encoding``, until the lag is back under the bound. A source
    that has fallen behind hands over its backlog in larger chunks (an LSL
    inlet pulls up to 50 ms, the ZeroMQ source joins waiting messages up to
    50 ms), which cost less per sample; detection alone on 50 ms chunks runs
    at several times real time at 384 channels, so the backlog drains instead
    of growing; no chunk is dropped by rtsort itself.

    Returns the run's statistics: counts, compute per chunk (total and per
    stage), and per spike the algorithmic wait (trough to the end of the chunk
    that completed it) and trough-to-emission time on the source clock; those
    of the peeled spikes (collisions and matches found in the residual, ``rtsort.peel``)
    apart, as ``peeled_wait_ms`` and ``peeled_trough_to_emit_ms``; what
    the samples did wrong (:class:`SignalHealth`: non-finite, saturated, flat
    and noisy channels). Sinks are closed on every exit, so spikes already
    found always reach the output; a sink that fails (a full disk) is reported
    in ``sink_errors`` and the others keep running. ``report``, if given, is
    called with the statistics so far every ``report_every_s`` seconds.
    ``watch_bundle``, a directory: a bundle written there (``rtsort curate
    --out``) takes over between two chunks, every spike from a cut sample on
    labelled by it (``rtsort.swap``; ``swaps`` in the statistics). ``cpu``:
    pin the loop's thread to that CPU (:func:`pin_to_cpu`). The garbage
    collector stays out of the loop (:data:`GC_EVERY_S`; ``gc_ms`` in the
    statistics).
    """
    from .streams import FileSource, open_sink, open_source
    from .streams.replay import now
    from .swap import BundleWatcher, SwappingSorter, differences

    if cpu is not None:
        pin_to_cpu(cpu, now=False)  # a bad CPU fails before anything is opened
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    pipe = Pipeline(bundle, 1.0, 0.0, threads, track_rate)  # compiled and warm before the source starts buffering
    pipe.warmup()
    sorter = SwappingSorter(pipe)
    fs = bundle.sampling_rate
    outs = [open_sink(s, fs) for s in sinks]  # consumers can connect before the first sample
    try:
        src = open_source(source, bundle.n_channels, bundle.sampling_rate, chunk_ms, speed,
                          gain_to_uV=bundle.gain_to_uV, resolve_timeout=resolve_timeout)
        if isinstance(src, FileSource):
            bundle.check_recording(src.recording)
    except BaseException:
        for sink in outs:
            sink.close()
        raise
    live = not (isinstance(src, FileSource) and not speed)

    def build(new_bundle):
        new = Pipeline(new_bundle, 1.0, 0.0, threads, track_rate, front=sorter.front)
        new.warmup(front=False)  # the front end is busy in the stream's thread
        return new

    watcher = None  # started in the loop's try, so that the sinks are closed whatever happens
    # constant memory over hours of a live run; peeled spikes (collisions, matches) wait for the residual: apart
    compute, sink_ns, latency, wait, arrival, peeled_latency, peeled_wait, gc_s = (Distribution() for _ in range(8))
    stages = [Distribution() for _ in STAGES]
    counts = {"chunks": 0, "samples": 0, "late_chunks": 0, "gaps": 0, "gap_samples": 0}
    health = SignalHealth(bundle.noise_levels[1], fs, 32767.0 * bundle.gain_to_uV)
    sink_errors = {}  # sink -> its first error; the others go on
    failed = set()  # sinks that raised: written to no more (a file sink counts its own failed writes and goes on)
    names = [s if isinstance(s, str) else getattr(s, "__name__", "callback") for s in sinks]

    def snapshot() -> dict:
        c = dict(counts)
        c.update(sorter.counts())
        c["malformed"] = dict(getattr(src, "malformed", {}))
        c["source_gaps"] = len(getattr(src, "gaps", []))
        c["source"] = src.stats() if hasattr(src, "stats") else {}  # a source's own counts (lost messages, ...)
        c["dropped_by_sinks"] = int(sum(getattr(s, "dropped", 0) for s in outs))
        c["sink_errors"] = dict(sink_errors)
        c["nonfinite_samples"] = int(sorter.front.preprocessor.n_nonfinite)
        c["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: KiB
        c.update(health.stats())
        c["swaps"] = list(sorter.swaps)
        c["swaps_refused"] = watcher.refused if watcher is not None else 0
        motion = sorter.front.motion
        c["motion_um"] = None if motion is None else {  # the tracker's estimate at the end of the run
            "displacement_um": motion.window_disp.round(2).tolist(), "window_centres_um": motion.centres.tolist(),
            "updates": motion.updates, "excluded_spikes": motion.excluded}
        return {**c,
                "compute_s_total": compute.total,
                "compute_ms": compute.percentiles(1000.0),
                "stage_ms": {name: d.percentiles(1000.0) for name, d in zip(STAGES, stages)},
                "sink_ms": sink_ns.percentiles(1000.0),
                "gc_ms": gc_s.percentiles(1000.0),
                "wait_ms": wait.percentiles(1000.0),
                "arrival_ms": arrival.percentiles(1000.0),
                "trough_to_emit_ms": latency.percentiles(1000.0),  # non-finite values (no timestamps) are left out
                "peeled_wait_ms": peeled_wait.percentiles(1000.0),
                "peeled_trough_to_emit_ms": peeled_latency.percentiles(1000.0)}

    expected = None
    last_data = time.monotonic()
    next_report = time.monotonic() + report_every_s
    gc_every = max(1, int(GC_EVERY_S * fs))
    gc_full = max(gc_every, int(GC_FULL_EVERY_S * fs))
    next_gc, next_full = gc_every, gc_full
    affinity = os.sched_getaffinity(0)
    gc_was_on, frozen_before = gc.isenabled(), gc.get_freeze_count()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        if watch_bundle is not None:
            watcher = BundleWatcher(watch_bundle, build, lambda new_bundle: differences(sorter.bundle, new_bundle))
        if cpu is not None:
            pin_to_cpu(cpu)
        while stop is None or not stop.is_set():
            if report is not None and time.monotonic() >= next_report:  # while data flows and while it does not
                next_report = time.monotonic() + report_every_s
                report(snapshot())
            chunk = src.read()
            if chunk is None:
                if isinstance(src, FileSource):
                    break
                if idle_timeout is not None and expected is not None and \
                        time.monotonic() - last_data > idle_timeout:
                    log.info("no samples for %.1f s: stopping", idle_timeout)
                    break
                continue
            last_data = time.monotonic()
            if expected is None:  # the first chunk: its source now knows the scale of its samples
                gains = getattr(src, "gains_to_uV", None)  # a file knows its gains
                if gains is None:  # a stream says it, or floats are uV and integers use the training gain
                    gains = getattr(src, "gain_to_uV", None) or (
                        bundle.gain_to_uV if chunk.samples.dtype.kind in "iu" else 1.0)
                sorter.front.preprocessor.set_scaling(gains, getattr(src, "offsets_to_uV", 0.0))
                health.set_scale(chunk.samples.dtype, gains)
                sorter.reset(chunk.first_sample)
                expected = chunk.first_sample
            t0 = time.perf_counter()
            if chunk.first_sample != expected:  # a gap: the filters restart at the new sample
                counts["gaps"] += 1
                counts["gap_samples"] += chunk.first_sample - expected
                sorter.reset(chunk.first_sample)
            if watcher is not None and not sorter.swapping:
                ready = watcher.take()
                if ready is not None:
                    sorter.begin(ready[0], str(watcher.path), ready[1])
            last = chunk.first_sample + chunk.n_samples - 1
            encode = True
            if live and chunk.timestamp is not None:  # its last sample was taken `lag` s ago
                lag = now() - (chunk.timestamp + (chunk.n_samples - 1) / fs)
                arrival.add_one(lag)
                if max_lag_ms is not None and lag * 1000.0 > max_lag_ms:
                    encode = False
                    counts["late_chunks"] += 1
            spikes = sorter.process(chunk.samples, encode=encode)
            expected = last + 1
            t1 = time.perf_counter_ns()
            if spikes.size:
                ts = (chunk.timestamp if chunk.timestamp is not None else np.nan) + \
                    (spikes["sample_index"] - chunk.first_sample) / fs
                late = now() - ts  # trough to emission, on the source's clock (NaN: an unpaced file, no timestamps)
                late_ms = (late * 1000.0).astype(np.float32)
                for name, sink in zip(names, outs):
                    if name in failed:
                        continue
                    try:
                        sink.write(spikes, ts, late_ms)
                    except Exception as exc:  # one sink's failure must not stop the others
                        failed.add(name)
                        sink_errors[name] = f"{type(exc).__name__}: {exc}"
                        log.error("sink %s failed (%s); the other sinks go on", name, sink_errors[name])
                    if getattr(sink, "error", None) and name not in sink_errors:  # it counts its own losses
                        sink_errors[name] = sink.error
                k = spikes.size - sorter.last_peeled
                if live:
                    latency.add(late[:k])
                    peeled_latency.add(late[k:])
                waits = (last - spikes["sample_index"]) / fs
                wait.add(waits[:k])
                peeled_wait.add(waits[k:])
            # in seconds: Distribution bins magnitudes up to 1e6, so nanoseconds above 1 ms would all fall in its
            # last bin (their percentiles read ~1.01 ms)
            sink_ns.add_one((time.perf_counter_ns() - t1) * 1e-9)
            health.update(chunk.first_sample, chunk.samples, sorter.last_filtered)  # after the spikes have left
            compute.add_one(time.perf_counter() - t0)
            for d, ns in zip(stages, sorter.stage_ns.tolist()):
                d.add_one(ns * 1e-9)
            counts["chunks"] += 1
            counts["samples"] += chunk.n_samples
            if counts["samples"] >= next_gc:
                full = counts["samples"] >= next_full
                next_gc = counts["samples"] + gc_every
                if full:
                    next_full = counts["samples"] + gc_full
                t2 = time.perf_counter()
                gc.collect(2 if full else 1)
                gc_s.add_one(time.perf_counter() - t2)
            if duration is not None and counts["samples"] >= duration * fs:
                break
    except KeyboardInterrupt:
        log.warning("interrupted: closing the sinks")
    finally:
        if cpu is not None:
            os.sched_setaffinity(0, affinity)
        if frozen_before == 0:
            gc.unfreeze()
        if gc_was_on:
            gc.enable()
        for name, sink in zip(names, outs):
            try:
                sink.close()
            except Exception as exc:  # the others are closed all the same
                before = sink_errors.get(name)
                sink_errors[name] = f"{before}; at close: {exc}" if before else f"{type(exc).__name__}: {exc}"
                log.error("sink %s failed at close (%s)", name, exc)
        src.close()
        if watcher is not None:
            watcher.close()
    stats = snapshot()
    log.info("run: %d chunks, %d spikes (%d unassigned, %d not encoded), %d gaps; compute per chunk p50 %.3f "
             "p99 %.3f ms", stats["chunks"], stats["spikes"], stats["unassigned"], stats["skipped_encoding"],
             stats["gaps"], stats["compute_ms"].get("p50", 0), stats["compute_ms"].get("p99", 0))
    return stats
