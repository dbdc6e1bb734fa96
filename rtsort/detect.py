"""The gradient detector: sharp slopes of the filtered signal, chunk-invariant.

Definition (the NumPy reference :func:`detect_reference` and the numba kernel
implement exactly this, and tests check they agree event for event):

1. Slope score per channel: ``z[t, c] = (x[t, c] - x[t - L, c]) * inv_noise[c]``
   (float32), with ``x[t < 0] = 0`` and ``L = slope_ms`` in samples; the noise
   of the slope is MAD / 0.6745 over a calibration window. For negative spikes
   the score is ``z``, for positive ``-z``, for both ``-|z|``.
2. A candidate is a (t, c) with score <= -threshold that is the lowest score
   among the channels within ``radius_um`` of c and the samples within
   ``sweep_ms`` of t (ties go to the earlier sample, then the lower channel).
3. The event is aligned to the voltage trough (the peak for positive slopes)
   of channel c within ``trough_search_ms`` after t; its amplitude is the
   filtered voltage there, in uV, and it must be at least ``amp_threshold``
   times the channel's voltage noise deep (a slope that ends nowhere is noise);
   with ``candidate_threshold`` > 0, the lower of the two (events between them
   are candidates that only a unit's template makes spikes: ``rtsort.pipeline``).
4. Candidates are taken in order of t, then c; an event closer than
   ``refractory_ms`` to the previous accepted event on its channel is dropped.
5. With ``trough_threshold`` > 0, a trough no slope event explains is a
   candidate too (``kind`` TROUGH; slope events are SLOPE): a (tau, c) whose
   voltage in noise units (signed as the score) is at least
   ``trough_threshold`` deep, the lowest among the channels
   within ``radius_um`` and the samples within ``sweep_ms``, with no slope
   event's trough (steps 2-4) on those channels within ``sweep_ms``. Weak
   units' spikes whose slope drowns in noise (the slope noise is about 1.4 x
   the voltage noise) still have their trough, and so do spikes whose slope
   a colliding spike hid; however deep, only a unit's template makes such a
   candidate a spike. It is decided at sample ``tau + sweep + D``, when every
   slope event that could explain it has been decided, and goes out in that
   order.

A slope event at t can be decided once sample ``t + D`` (D = max(sweep,
search)) has arrived; the kernel keeps ring buffers of the last samples and
scores, so any chunking (1 sample to hours) gives identical events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from .config import DetectConfig
from .errors import ConfigError
from .types import EVENT_DTYPE, SLOPE, TROUGH, Probe

_POLARITY_CODES = {"neg": 0, "pos": 1, "both": 2}
MAD_TO_SIGMA = 1.0 / 0.6744897501960817


@dataclass(frozen=True)
class DetectParams:
    """The detector's configuration converted to samples for one sampling rate."""

    threshold: float
    amp_threshold: float  # the depth an event needs: the lower of amp_threshold and candidate_threshold
    trough_threshold: float  # the depth of a trough candidate (step 5); 0: none
    slope: int
    sweep: int
    search: int
    refractory: int
    polarity: int

    @property
    def troughs(self) -> bool:
        """Whether troughs without a slope event are handed over as candidates (step 5 of the definition)."""
        return self.trough_threshold > 0

    @property
    def delay(self) -> int:
        """Samples after a slope before its event can be decided."""
        return max(self.sweep, self.search)

    @property
    def max_age(self) -> int:
        """The most samples an event's trough can lie behind the newest sample when it is decided."""
        return self.delay + (self.sweep if self.troughs else 0)

    @classmethod
    def from_config(cls, cfg: DetectConfig, sampling_rate: float) -> "DetectParams":
        def samples(ms: float) -> int:
            return int(round(ms * sampling_rate / 1000.0))

        return cls(
            threshold=float(cfg.threshold),
            amp_threshold=float(min(cfg.amp_threshold, cfg.candidate_threshold) if cfg.candidate_threshold > 0
                                else cfg.amp_threshold),
            trough_threshold=float(cfg.trough_threshold),
            slope=max(1, samples(cfg.slope_ms)),
            sweep=samples(cfg.sweep_ms),
            search=samples(cfg.trough_search_ms),
            refractory=samples(cfg.refractory_ms),
            polarity=_POLARITY_CODES[cfg.polarity],
        )


NOISE_SAMPLES = 60000


def _row_median(t: np.ndarray) -> np.ndarray:
    """Median of each row (as ``np.median(t, axis=1)``, in float64), by one partial sort: 5x faster."""
    n = t.shape[1]
    k = n // 2
    if n % 2:
        return np.partition(t, k, axis=1)[:, k].astype(np.float64)
    p = np.partition(t, (k - 1, k), axis=1)
    return (p[:, k - 1].astype(np.float64) + p[:, k]) / 2.0


def mad_noise(a: np.ndarray) -> np.ndarray:
    """Per-column noise MAD / 0.6745, shape (n_channels,) float32; a flat channel gets inf (never triggers)."""
    t = np.ascontiguousarray(a.T)  # one contiguous row per channel: selection is much faster than down columns
    med = _row_median(t)
    np.subtract(t, med[:, None].astype(t.dtype), out=t)
    np.abs(t, out=t)
    noise = (_row_median(t) * MAD_TO_SIGMA).astype(np.float32)
    return np.where(noise > 0, noise, np.float32(np.inf)).astype(np.float32)


def estimate_noise_levels(filtered: np.ndarray, slope: int) -> np.ndarray:
    """Per-channel noise of the slope ``x[t] - x[t - slope]`` and of the voltage ``x``: MAD / 0.6745.

    Parameters
    ----------
    filtered : ndarray of shape (n_samples, n_channels), float32
        Preprocessed calibration window (uV).

    Returns
    -------
    ndarray of shape (2, n_channels), float32
        Row 0: slope noise (uV per slope), row 1: voltage noise (uV).
    """
    if filtered.shape[0] <= slope + 1:
        raise ConfigError(f"calibration window of {filtered.shape[0]} samples is too short for the noise levels")
    x = filtered.astype(np.float32, copy=False)
    # MAD from at most NOISE_SAMPLES samples per channel, spread evenly over the window
    # (the estimate's error is ~0.3 % there; all 300k samples of 10 s cost 5x the time)
    step = max(1, (x.shape[0] - slope) // NOISE_SAMPLES)
    return np.stack([mad_noise(x[slope::step] - x[:-slope:step]), mad_noise(x[::step])])


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _steepest_nearby(sr, mask, nbr_c, n_nbr_c, tc, t_first, c, s, sweep):
    """Whether score ``s`` at (tc, c) is the lowest within the neighbours and +/- sweep.

    Samples before the stream's first (``t_first``) do not count. Ties go to
    the earlier sample, then the lower channel.
    """
    for j in range(n_nbr_c):
        q = nbr_c[j]
        for dt in range(-sweep, sweep + 1):
            if (q == c and dt == 0) or tc + dt < t_first:
                continue
            w = sr[(tc + dt) & mask, q]
            if w < s or (w == s and (dt < 0 or (dt == 0 and q < c))):
                return False
    return True


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _extremum_after(xr, mask, tc, c, search, falling):
    """First minimum (``falling``) or maximum of channel c over [tc, tc + search]: (sample, value)."""
    tt = tc
    best = xr[tc & mask, c]
    for k in range(1, search + 1):
        v = xr[(tc + k) & mask, c]
        if (falling and v < best) or ((not falling) and v > best):
            best = v
            tt = tc + k
    return tt, best


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _trough_score(xr, inv_vnoise, row, c, a, b):
    """The voltage in noise units, signed as the slope score (a, b: see :func:`_detect_kernel`)."""
    v = xr[row, c] * inv_vnoise[c]
    return a * v - b * abs(v)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _lowest_trough(xr, inv_vnoise, a, b, marks, mask, nbr_c, n_nbr_c, tau, c, s, sweep):
    """Whether trough score ``s`` at (tau, c) is the lowest within the neighbours and +/- sweep, with no
    slope event's trough there (``marks`` holds, per ring row, the sample of the trough marked in it).
    Ties go to the earlier sample, then the lower channel."""
    for j in range(n_nbr_c):
        q = nbr_c[j]
        for dt in range(-sweep, sweep + 1):
            r = (tau + dt) & mask
            if marks[r, q] == tau + dt:
                return False
            if q == c and dt == 0:
                continue
            w = _trough_score(xr, inv_vnoise, r, q, a, b)
            if w < s or (w == s and (dt < 0 or (dt == 0 and q < c))):
                return False
    return True


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _detect_kernel(x, start, rings, marks, state, clock, noise, thr, iparams, nbr, n_nbr, flags, out):
    """Feed samples ``x[start:]`` (float32, (n, C)) through the detector.

    ``rings`` (2, R, C) float32: voltages and slope scores over the last R
    samples, indexed by absolute sample & (R - 1); ``marks`` (R, C) int64:
    the sample of each slope event's trough, in its row. ``state`` (3, C)
    int64: per channel the last accepted trough, the last sample at or below ``-amp_min`` and the last at or above
    ``amp_min``. A slope with no such sample since it began cannot pass the
    depth test, so most noise slopes are rejected in one vectorised pass over
    the channels instead of one by one. ``clock`` (2,) int64: the absolute
    index of the next sample and of the stream's first. ``noise`` (3, C)
    float32: inverse slope noise, ``amp_min`` (uV) and inverse voltage noise.
    ``thr`` (2,) float32: slope threshold and trough candidate depth in
    noise units. ``iparams``: slope, sweep, search, refractory (samples), polarity,
    R - 1, troughs (0/1). ``flags`` is uint8 scratch, a multiple of 8 long,
    zero-padded. Events go to ``out`` (EVENT_DTYPE); stops early when it
    could overflow. Returns ``(n_events, next_row)``.
    """
    n, n_ch = x.shape
    slope, sweep, search, refr, polarity, mask = iparams[0], iparams[1], iparams[2], iparams[3], iparams[4], iparams[5]
    troughs = iparams[6] != 0
    xr = rings[0]
    sr = rings[1]
    last = state[0]
    low = state[1]
    high = state[2]
    inv_noise = noise[0]
    amp_min = noise[1]
    inv_vnoise = noise[2]
    s_thr = thr[0]
    c_thr = -thr[1]
    t_first = clock[1]
    delay = max(sweep, search)
    cap = out.shape[0]
    words = flags.view(np.uint64)
    # score = a * slope - b * |slope|: the slope (neg), its negation (pos), -|slope| (both); the same for troughs
    a = np.float32(1.0) if polarity == 0 else (np.float32(-1.0) if polarity == 1 else np.float32(0.0))
    b = np.float32(1.0) if polarity == 2 else np.float32(0.0)
    use_low = polarity != 1
    use_high = polarity != 0
    n_out = 0
    t_abs = clock[0]
    i = start
    while i < n:
        if n_out + 2 * n_ch > cap:
            break
        # whole-row loops over 1-D views with few pointers each, so LLVM vectorises them
        xnew = xr[t_abs & mask]
        xold = xr[(t_abs - slope) & mask]
        srow = sr[t_abs & mask]
        xnew[:] = x[i]
        for c in range(n_ch):
            g = (xnew[c] - xold[c]) * inv_noise[c]
            srow[c] = a * g - b * abs(g)
        for c in range(n_ch):
            low[c] = t_abs if xnew[c] <= -amp_min[c] else low[c]
        for c in range(n_ch):
            high[c] = t_abs if xnew[c] >= amp_min[c] else high[c]
        tc = t_abs - delay
        t_abs += 1
        i += 1
        if tc < t_first:
            continue
        pc = tc & mask
        scand = sr[pc]
        for c in range(n_ch):
            flags[c] = (scand[c] <= -s_thr) & (((low[c] >= tc) & use_low) | ((high[c] >= tc) & use_high))
        for wi in range(words.shape[0]):
            if words[wi] == 0:  # eight channels without a candidate
                continue
            for c in range(wi * 8, min(wi * 8 + 8, n_ch)):
                if not flags[c]:
                    continue
                # a falling slope goes to a trough, a rising one to a peak
                falling = polarity == 0
                if polarity == 2:
                    prev = xr[(tc - slope) & mask, c] if tc - slope >= t_first else np.float32(0.0)
                    falling = (xr[pc, c] - prev) * inv_noise[c] < 0
                tt, v = _extremum_after(xr, mask, tc, c, search, falling)
                if (falling and v > -amp_min[c]) or ((not falling) and v < amp_min[c]):
                    continue
                if not _steepest_nearby(sr, mask, nbr[c], n_nbr[c], tc, t_first, c, sr[pc, c], sweep):
                    continue
                if tt - last[c] <= refr:
                    continue
                last[c] = tt
                if troughs:
                    marks[tt & mask, c] = tt
                out[n_out].sample_index = tt
                out[n_out].channel = c
                out[n_out].amplitude = v
                out[n_out].kind = SLOPE
                n_out += 1
        tau = tc - sweep  # every slope event whose trough could lie within sweep of tau is decided by now
        if not troughs or tau < t_first:
            continue
        pt = tau & mask
        pp = (tau - 1) & mask
        pn = (tau + 1) & mask
        for c in range(n_ch):  # deep enough, and a local minimum in time (ties go to the earlier sample)
            y = _trough_score(xr, inv_vnoise, pt, c, a, b)
            flags[c] = (y <= c_thr) & ((sweep == 0) | ((y < _trough_score(xr, inv_vnoise, pp, c, a, b)) &
                                                       (y <= _trough_score(xr, inv_vnoise, pn, c, a, b))))
        for wi in range(words.shape[0]):
            if words[wi] == 0:
                continue
            for c in range(wi * 8, min(wi * 8 + 8, n_ch)):
                if flags[c] and _lowest_trough(xr, inv_vnoise, a, b, marks, mask, nbr[c], n_nbr[c], tau, c,
                                               _trough_score(xr, inv_vnoise, pt, c, a, b), sweep):
                    out[n_out].sample_index = tau
                    out[n_out].channel = c
                    out[n_out].amplitude = xr[pt, c]
                    out[n_out].kind = TROUGH
                    n_out += 1
    clock[0] = t_abs
    return n_out, i


def _kernel_noise(noise: np.ndarray, params: DetectParams):
    """Inverse slope noise, the minimum trough depth (uV) and the inverse voltage noise the kernel works with."""
    inv = (np.float32(1.0) / noise[0]).astype(np.float32)
    amp_min = (np.float32(params.amp_threshold) * noise[1]).astype(np.float32)
    inv_v = (np.float32(1.0) / noise[1]).astype(np.float32)
    return inv, amp_min, inv_v


def _ring_size(params: DetectParams) -> int:
    need = params.slope + 2 * params.delay + 2 * params.sweep + 2
    size = 1
    while size < need:
        size *= 2
    return size


class GradientDetector:
    """Stateful, chunk-invariant gradient detector.

    Parameters
    ----------
    cfg : DetectConfig
    probe : Probe
    sampling_rate : float
    noise_levels : ndarray of shape (2, n_channels), optional
        Slope noise (row 0, uV per slope) and voltage noise (row 1, uV) per
        channel, as :func:`estimate_noise_levels` gives; set later with
        :meth:`calibrate` or :meth:`set_noise_levels` if not given.
    """

    def __init__(self, cfg: DetectConfig, probe: Probe, sampling_rate: float, noise_levels=None,
                 capacity: int = 8192):
        self.cfg = cfg
        self.probe = probe
        self.sampling_rate = float(sampling_rate)
        self.params = DetectParams.from_config(cfg, sampling_rate)
        self.n_channels = probe.n_channels
        nbr = probe.neighbours(cfg.radius_um)
        self._nbr = np.ascontiguousarray(nbr, dtype=np.int32)
        self._n_nbr = (nbr >= 0).sum(1).astype(np.int32)
        ring = _ring_size(self.params)
        p = self.params
        self._iparams = np.array([p.slope, p.sweep, p.search, p.refractory, p.polarity, ring - 1, int(p.troughs)],
                                 dtype=np.int64)
        self._thr = np.array([p.threshold, p.trough_threshold], dtype=np.float32)
        self._rings = np.zeros((2, ring, self.n_channels), dtype=np.float32)
        self._marks = np.zeros((ring, self.n_channels), dtype=np.int64)
        self._state = np.zeros((3, self.n_channels), dtype=np.int64)
        self._clock = np.zeros(2, dtype=np.int64)
        self._out = np.zeros(max(int(capacity), 2 * self.n_channels), dtype=EVENT_DTYPE)
        self._flags = np.zeros(-(-self.n_channels // 8) * 8, dtype=np.uint8)
        self.noise_levels = None
        self._noise = None
        if noise_levels is not None:
            self.set_noise_levels(noise_levels)
        self.reset()

    @property
    def delay_samples(self) -> int:
        """Samples after a slope before its event is decided (the detector's look-ahead)."""
        return self.params.delay

    @property
    def max_event_age(self) -> int:
        """The most samples an event's trough lies behind the newest sample when the event leaves."""
        return self.params.max_age

    @property
    def event_ages(self) -> tuple:
        """The most samples an event's trough lies behind the newest sample when it leaves, per ``kind``."""
        return (self.params.delay, self.params.max_age)

    def reset(self, first_sample: int = 0) -> None:
        """Clear the state; the next sample fed has absolute index ``first_sample``."""
        self._rings[:] = 0
        self._marks[:] = np.iinfo(np.int64).min
        self._state[:] = np.iinfo(np.int64).min // 2
        self._clock[:] = first_sample

    def set_noise_levels(self, noise_levels) -> None:
        """Use these noise levels, shape (2, n_channels): slope noise, voltage noise."""
        noise = np.asarray(noise_levels, dtype=np.float32)
        if noise.shape != (2, self.n_channels):
            raise ConfigError(f"noise_levels has shape {noise.shape}, expected (2, {self.n_channels})")
        if not np.all(noise > 0):
            raise ConfigError("noise_levels must be positive")
        self.noise_levels = noise
        self._noise = np.stack(_kernel_noise(noise, self.params))

    def calibrate(self, filtered: np.ndarray) -> np.ndarray:
        """Estimate the noise levels from a filtered calibration window and keep them."""
        noise = estimate_noise_levels(filtered, self.params.slope)
        self.set_noise_levels(noise)
        return noise

    def process(self, filtered: np.ndarray) -> np.ndarray:
        """Feed a chunk of filtered samples; return the events decided by it.

        Parameters
        ----------
        filtered : ndarray of shape (n_samples, n_channels), float32 (uV)

        Returns
        -------
        ndarray of EVENT_DTYPE, sorted by decision time (slope sample, then channel)
        """
        if self._noise is None:
            raise ConfigError("the detector has no noise levels: call calibrate() or set_noise_levels() first")
        if filtered.ndim != 2 or filtered.shape[1] != self.n_channels:
            raise ConfigError(f"chunk has shape {filtered.shape}, expected (n_samples, {self.n_channels})")
        if filtered.dtype != np.float32 or not filtered.flags.c_contiguous:
            filtered = np.ascontiguousarray(filtered, dtype=np.float32)
        args = (self._rings, self._marks, self._state, self._clock, self._noise, self._thr, self._iparams, self._nbr,
                self._n_nbr, self._flags, self._out)
        n_out, i = _detect_kernel(filtered, 0, *args)
        events = self._out[:n_out].copy()
        while i < filtered.shape[0]:  # the output buffer filled up: rare, a burst in a long chunk
            n_out, i = _detect_kernel(filtered, i, *args)
            events = np.concatenate([events, self._out[:n_out]])
        return events

    def warmup(self) -> None:
        """Compile the kernel before the first real chunk (on a scratch detector: no state changes)."""
        scratch = GradientDetector(self.cfg, self.probe, self.sampling_rate,
                                   np.ones((2, self.n_channels), dtype=np.float32))
        scratch.process(np.zeros((2, self.n_channels), dtype=np.float32))


def detect_reference(filtered: np.ndarray, noise_levels: np.ndarray, cfg: DetectConfig, probe: Probe,
                     sampling_rate: float) -> np.ndarray:
    """Plain NumPy implementation of the detector over a whole array (tests' reference).

    Gives exactly the events of :class:`GradientDetector` fed the same samples in
    any chunking (events need ``D`` samples of look-ahead, so slopes in the last
    ``D`` samples are not decided, in either implementation).
    """
    p = DetectParams.from_config(cfg, sampling_rate)
    x = np.asarray(filtered, dtype=np.float32)
    n, n_ch = x.shape
    inv, amp_min, inv_v = _kernel_noise(np.asarray(noise_levels, dtype=np.float32), p)
    xpad = np.vstack([np.zeros((p.slope, n_ch), np.float32), x])
    z = (x - xpad[:n]) * inv[None, :]
    score = z if p.polarity == 0 else (-z if p.polarity == 1 else -np.abs(z))
    nbr = probe.neighbours(cfg.radius_um)
    last_t = n - 1 - p.delay
    cand_t, cand_c = np.nonzero(score[: max(last_t + 1, 0)] <= -np.float32(p.threshold))
    order = np.lexsort((cand_c, cand_t))
    last = np.full(n_ch, np.iinfo(np.int64).min // 2, dtype=np.int64)
    rows = []
    for t, c in zip(cand_t[order], cand_c[order]):
        s = score[t, c]
        best = True
        for q in nbr[c][nbr[c] >= 0]:
            lo, hi = max(0, t - p.sweep), t + p.sweep + 1
            w = score[lo:hi, q]
            dts = np.arange(lo, hi) - t
            beats = (w < s) | ((w == s) & ((dts < 0) | ((dts == 0) & (q < c))))
            if q == c:
                beats &= dts != 0
            if beats.any():
                best = False
                break
        if not best:
            continue
        if p.polarity == 0:
            falling = True
        elif p.polarity == 1:
            falling = False
        else:
            falling = z[t, c] < 0
        seg = x[t : t + p.search + 1, c]
        k = int(np.argmin(seg) if falling else np.argmax(seg))
        if (falling and seg[k] > -amp_min[c]) or (not falling and seg[k] < amp_min[c]):
            continue
        tt = t + k
        if tt - last[c] <= p.refractory:
            continue
        last[c] = tt
        rows.append((t, SLOPE, c, tt, seg[k]))  # decided at its slope sample t
    if p.troughs:  # step 5: troughs no slope event explains, decided `sweep` samples after them
        v = x * inv_v[None, :]
        y = v if p.polarity == 0 else (-v if p.polarity == 1 else -np.abs(v))
        marks = np.zeros((n, n_ch), bool)
        for r in rows:
            marks[r[3], r[2]] = True
        last_tau = last_t - p.sweep
        yc = y[: max(last_tau + 1, 0)]
        tr_t, tr_c = np.nonzero(yc <= -np.float32(p.trough_threshold))
        for tau, c in zip(tr_t, tr_c):
            s = y[tau, c]
            lo, hi = max(0, tau - p.sweep), tau + p.sweep + 1
            dts = np.arange(lo, hi) - tau
            ok = True
            for q in nbr[c][nbr[c] >= 0]:
                w = y[lo:hi, q]
                beats = (w < s) | ((w == s) & ((dts < 0) | ((dts == 0) & (q < c))))
                if q == c:
                    beats &= dts != 0
                if beats.any() or marks[lo:hi, q].any():
                    ok = False
                    break
            if ok:
                rows.append((tau + p.sweep, TROUGH, c, tau, x[tau, c]))
    rows.sort(key=lambda r: r[:3])
    ev = np.zeros(len(rows), dtype=EVENT_DTYPE)
    if rows:
        ev["sample_index"] = [r[3] for r in rows]
        ev["channel"] = [r[2] for r in rows]
        ev["amplitude"] = [r[4] for r in rows]
        ev["kind"] = [r[1] for r in rows]
    return ev
