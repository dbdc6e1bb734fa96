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
   times the channel's voltage noise deep (a slope that ends nowhere is noise).
4. Candidates are taken in order of t, then c; an event closer than
   ``refractory_ms`` to the previous accepted event on its channel is dropped.

A candidate at t can be decided once sample ``t + D`` (D = max(sweep, search))
has arrived; the kernel keeps ring buffers of the last samples and scores, so
any chunking (1 sample to hours) gives identical events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from .config import DetectConfig
from .errors import ConfigError
from .types import EVENT_DTYPE, Probe

_POLARITY_CODES = {"neg": 0, "pos": 1, "both": 2}
MAD_TO_SIGMA = 1.0 / 0.6744897501960817


@dataclass(frozen=True)
class DetectParams:
    """The detector's configuration converted to samples for one sampling rate."""

    threshold: float
    amp_threshold: float
    slope: int
    sweep: int
    search: int
    refractory: int
    polarity: int

    @property
    def delay(self) -> int:
        """Samples after a slope before its event can be decided."""
        return max(self.sweep, self.search)

    @classmethod
    def from_config(cls, cfg: DetectConfig, sampling_rate: float) -> "DetectParams":
        def samples(ms: float) -> int:
            return int(round(ms * sampling_rate / 1000.0))

        return cls(
            threshold=float(cfg.threshold),
            amp_threshold=float(cfg.amp_threshold),
            slope=max(1, samples(cfg.slope_ms)),
            sweep=samples(cfg.sweep_ms),
            search=samples(cfg.trough_search_ms),
            refractory=samples(cfg.refractory_ms),
            polarity=_POLARITY_CODES[cfg.polarity],
        )


def _mad_noise(a: np.ndarray) -> np.ndarray:
    med = np.median(a, axis=0)
    noise = (np.median(np.abs(a - med), axis=0) * MAD_TO_SIGMA).astype(np.float32)
    # a dead (flat) channel gets an infinite noise so it never triggers
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
    return np.stack([_mad_noise(x[slope:] - x[:-slope]), _mad_noise(x)])


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _detect_kernel(x, start, xr, sr, last, deep, inv_noise, amp_min, nbr, n_nbr, thr, slope, sweep, search,
                   refr, polarity, mask, flags, out_t, out_c, out_a):
    """Feed samples ``x[start:]`` (float32, (n, C)) through the detector.

    ``amp_min`` (C,) is the smallest trough depth accepted, in uV. ``deep`` (2, C)
    holds, per channel, the last sample at or below ``-amp_min`` (row 0) and at
    or above ``amp_min`` (row 1): a slope with no such sample since it began
    cannot pass the depth test, which rejects most noise slopes in the
    vectorised flag pass instead of one by one.
    State: ``xr``/``sr`` rings (R, C) of voltages and scores, ``last`` (C,)
    last accepted trough per channel, ``mask`` = R - 1 and ``sr``'s absolute
    clock in ``last``'s extra slot ``last[C]`` (the next sample's index).
    Stops early when the output arrays could overflow; returns
    ``(n_events, next_row)``.
    """
    n, n_ch = x.shape
    delay = max(sweep, search)
    cap = out_t.shape[0]
    words = flags.view(np.uint64)  # flags: uint8, length a multiple of 8, zero-padded
    n_out = 0
    t_abs = last[n_ch]
    i = start
    while i < n:
        if n_out + n_ch > cap:
            break
        p = t_abs & mask
        pl = (t_abs - slope) & mask
        # one branch-free loop per polarity, so each vectorises
        if polarity == 0:
            for c in range(n_ch):
                v = x[i, c]
                sr[p, c] = (v - xr[pl, c]) * inv_noise[c]
                xr[p, c] = v
                deep[0, c] = t_abs if v <= -amp_min[c] else deep[0, c]
        elif polarity == 1:
            for c in range(n_ch):
                v = x[i, c]
                sr[p, c] = -((v - xr[pl, c]) * inv_noise[c])
                xr[p, c] = v
                deep[1, c] = t_abs if v >= amp_min[c] else deep[1, c]
        else:
            for c in range(n_ch):
                v = x[i, c]
                sr[p, c] = -abs((v - xr[pl, c]) * inv_noise[c])
                xr[p, c] = v
                deep[0, c] = t_abs if v <= -amp_min[c] else deep[0, c]
                deep[1, c] = t_abs if v >= amp_min[c] else deep[1, c]
        tc = t_abs - delay
        if tc >= 0:
            pc = tc & mask
            # flag candidates in a vectorised pass, then skip 8 channels at a time
            if polarity == 0:
                for c in range(n_ch):
                    flags[c] = (sr[pc, c] <= -thr) & (deep[0, c] >= tc)
            elif polarity == 1:
                for c in range(n_ch):
                    flags[c] = (sr[pc, c] <= -thr) & (deep[1, c] >= tc)
            else:
                for c in range(n_ch):
                    flags[c] = (sr[pc, c] <= -thr) & ((deep[0, c] >= tc) | (deep[1, c] >= tc))
            for wi in range(words.shape[0]):
                if words[wi] == 0:
                    continue
                for c in range(wi * 8, min(wi * 8 + 8, n_ch)):
                    s = sr[pc, c]
                    if not s <= -thr:
                        continue
                    # trough (or peak) first: this cheap test rejects most noise candidates
                    falling = True
                    if polarity == 1:
                        falling = False
                    elif polarity == 2:
                        prev = xr[(tc - slope) & mask, c] if tc - slope >= 0 else np.float32(0.0)
                        falling = (xr[pc, c] - prev) * inv_noise[c] < 0
                    tt = tc
                    best_v = xr[pc, c]
                    for k in range(1, search + 1):
                        vk = xr[(tc + k) & mask, c]
                        if (falling and vk < best_v) or ((not falling) and vk > best_v):
                            best_v = vk
                            tt = tc + k
                    if (falling and best_v > -amp_min[c]) or ((not falling) and best_v < amp_min[c]):
                        continue
                    best = True
                    for j in range(n_nbr[c]):
                        q = nbr[c, j]
                        for dt in range(-sweep, sweep + 1):
                            if q == c and dt == 0:
                                continue
                            if tc + dt < 0:
                                continue
                            w = sr[(tc + dt) & mask, q]
                            if w < s or (w == s and (dt < 0 or (dt == 0 and q < c))):
                                best = False
                                break
                        if not best:
                            break
                    if not best:
                        continue
                    if tt - last[c] <= refr:
                        continue
                    last[c] = tt
                    out_t[n_out] = tt
                    out_c[n_out] = c
                    out_a[n_out] = best_v
                    n_out += 1
        t_abs += 1
        i += 1
    last[n_ch] = t_abs
    return n_out, i


def _kernel_noise(noise: np.ndarray, params: DetectParams):
    """Inverse slope noise and the minimum trough depth (uV) the kernel works with."""
    inv = (np.float32(1.0) / noise[0]).astype(np.float32)
    amp_min = (np.float32(params.amp_threshold) * noise[1]).astype(np.float32)
    return inv, amp_min


def _ring_size(params: DetectParams) -> int:
    need = params.slope + 2 * params.delay + params.sweep + 2
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
        self._ring = _ring_size(self.params)
        cap = max(int(capacity), 2 * self.n_channels)
        self._out_t = np.zeros(cap, dtype=np.int64)
        self._out_c = np.zeros(cap, dtype=np.int32)
        self._out_a = np.zeros(cap, dtype=np.float32)
        self._flags = np.zeros(-(-self.n_channels // 8) * 8, dtype=np.uint8)
        self.noise_levels = None
        self._inv_noise = None
        self._amp_min = None
        if noise_levels is not None:
            self.set_noise_levels(noise_levels)
        self.reset()

    @property
    def delay_samples(self) -> int:
        """Samples after a slope before its event is decided (the detector's look-ahead)."""
        return self.params.delay

    def reset(self, first_sample: int = 0) -> None:
        """Clear the state; the next sample fed has absolute index ``first_sample``."""
        self._xr = np.zeros((self._ring, self.n_channels), dtype=np.float32)
        self._sr = np.zeros((self._ring, self.n_channels), dtype=np.float32)
        self._last = np.full(self.n_channels + 1, np.iinfo(np.int64).min // 2, dtype=np.int64)
        self._last[self.n_channels] = 0
        self._deep = np.full((2, self.n_channels), np.iinfo(np.int64).min // 2, dtype=np.int64)
        self._offset = int(first_sample)

    def set_noise_levels(self, noise_levels) -> None:
        """Use these noise levels, shape (2, n_channels): slope noise, voltage noise."""
        noise = np.asarray(noise_levels, dtype=np.float32)
        if noise.shape != (2, self.n_channels):
            raise ConfigError(f"noise_levels has shape {noise.shape}, expected (2, {self.n_channels})")
        if not np.all(noise > 0):
            raise ConfigError("noise_levels must be positive")
        self.noise_levels = noise
        self._inv_noise, self._amp_min = _kernel_noise(noise, self.params)

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
        if self._inv_noise is None:
            raise ConfigError("the detector has no noise levels: call calibrate() or set_noise_levels() first")
        if filtered.ndim != 2 or filtered.shape[1] != self.n_channels:
            raise ConfigError(f"chunk has shape {filtered.shape}, expected (n_samples, {self.n_channels})")
        if filtered.dtype != np.float32:
            filtered = filtered.astype(np.float32)
        p = self.params
        pieces = []
        i = 0
        n = filtered.shape[0]
        while True:
            n_out, i = _detect_kernel(
                filtered, i, self._xr, self._sr, self._last, self._deep, self._inv_noise, self._amp_min,
                self._nbr, self._n_nbr,
                np.float32(p.threshold), p.slope, p.sweep, p.search, p.refractory, p.polarity,
                self._ring - 1, self._flags, self._out_t, self._out_c, self._out_a,
            )
            ev = np.empty(n_out, dtype=EVENT_DTYPE)
            ev["sample_index"] = self._out_t[:n_out] + self._offset
            ev["channel"] = self._out_c[:n_out]
            ev["amplitude"] = self._out_a[:n_out]
            pieces.append(ev)
            if i >= n:
                break
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def warmup(self) -> None:
        """Compile the kernel before the first real chunk, leaving the state untouched."""
        saved = (self._xr.copy(), self._sr.copy(), self._last.copy(), self._deep.copy(), self._inv_noise,
                 self._amp_min)
        if self._inv_noise is None:
            self._inv_noise, self._amp_min = _kernel_noise(
                np.ones((2, self.n_channels), dtype=np.float32), self.params)
        self.process(np.zeros((2, self.n_channels), dtype=np.float32))
        self._xr, self._sr, self._last, self._deep, self._inv_noise, self._amp_min = saved


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
    inv, amp_min = _kernel_noise(np.asarray(noise_levels, dtype=np.float32), p)
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
        rows.append((tt, c, seg[k]))
    ev = np.zeros(len(rows), dtype=EVENT_DTYPE)
    if rows:
        ev["sample_index"] = [r[0] for r in rows]
        ev["channel"] = [r[1] for r in rows]
        ev["amplitude"] = [r[2] for r in rows]
    return ev
