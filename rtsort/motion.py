"""Motion correction: the probe moves in the brain, so the units move along the probe.

The front end works in a *reference frame*, the probe's position at the start
of the training recording. Between preprocessing and detection, each chunk is
resampled from where the units are now to where they were then:

    corrected[:, c] = signal at (x_c, y_c + d_c)   (kriging over the nearest channels)

where ``d_c`` is the probe's displacement at channel ``c`` (um along y,
positive: the units appear at larger y). Detection, snippets, features and
templates all see the reference frame, so a bundle's units stay where it
learnt them.

The displacement is piecewise constant over *steps* (``[motion] step_s``) at
fixed sample boundaries, so the result does not depend on how the stream is
chunked. Two sources give it:

- :class:`MotionSchedule`: a displacement known in advance (training
  estimates it over the whole recording with SpikeInterface's DREDge).
- :class:`MotionTracker`: the runtime's causal estimate. At each step
  boundary it registers the recent spikes against the bundle's reference, a
  histogram of the training spikes' depth and amplitude in the reference
  frame: the shift that best aligns the recent histogram (an exponentially
  weighted memory of ``tau_s``) with the reference, per spatial window along
  the probe, is the displacement for the next step. It uses only the
  detector's spikes, never the labels, so a wrong label cannot pull it, and
  leaves out the spikes of channels that were noisy during the step (as the
  run's channel health defines it, ``rtsort.dsp.noisy_channels``): a channel
  of pure noise fires hundreds of spikes a second at one depth, which would
  otherwise pull the registration towards it.

Nothing here imports SpikeInterface or torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numba
import numpy as np

from .config import MotionConfig
from .dsp import HEALTH_STRIDE_S, noisy_channels
from .features import LOCATION_FLOOR, _prepare
from .types import Probe

log = logging.getLogger("rtsort.motion")

KRIGING_SIGMA_UM = 20.0  # SpikeInterface's interpolate_motion default (exponential kernel, p = 1)
KRIGING_NEIGHBOURS = 6  # source channels per corrected channel
KRIGING_RIDGE = 0.01
GRID_UM = 1.0  # displacements are applied rounded to this step; 0 is the identity
AMPLITUDE_BINS = np.log2([4.0, 6.0, 9.0, 14.0, 22.0, 35.0])  # log2 peak amplitude in noise units (bin edges)
HIST_SMOOTH_UM = 3.0  # Gaussian smoothing of the depth histograms before registration
MIN_SPIKES = 20.0  # a window holding less (exponentially weighted) keeps its last displacement


def motion_enabled(cfg: MotionConfig, probe: Probe) -> bool:
    """Whether motion correction runs for this probe: ``mode`` "auto" turns it on when the probe spans at least
    ``auto_min_span_um`` along y (a short probe holds too few units at distinct depths to register)."""
    if cfg.mode == "off":
        return False
    if cfg.mode == "auto":
        y = probe.positions_um[:, 1]
        return bool(y.max() - y.min() >= cfg.auto_min_span_um)
    return True


def spatial_windows(probe: Probe, cfg: MotionConfig) -> np.ndarray:
    """Centres (um along y) of the non-rigid windows: one per ``window_um`` of the probe's span (one window:
    rigid)."""
    y = probe.positions_um[:, 1]
    lo, hi = float(y.min()), float(y.max())
    n = 1 if cfg.mode == "rigid" else max(1, int(round((hi - lo) / cfg.window_um)))
    return (lo + (np.arange(n) + 0.5) * (hi - lo) / n).astype(np.float64)


def window_weights(depths: np.ndarray, centres: np.ndarray, window_um: float) -> np.ndarray:
    """Gaussian weights (len(depths), n_windows) of each depth in each window, rows summing to 1."""
    if centres.size == 1:
        return np.ones((depths.size, 1))
    w = np.exp(-0.5 * ((depths[:, None] - centres[None, :]) / (0.5 * window_um)) ** 2) + 1e-12
    return w / w.sum(axis=1, keepdims=True)


def channel_displacement(window_disp: np.ndarray, centres: np.ndarray, depths: np.ndarray) -> np.ndarray:
    """Per-channel displacement from the windows' (linear between centres, flat beyond)."""
    if centres.size == 1:
        return np.full(depths.size, float(window_disp[0]))
    return np.interp(depths, centres, window_disp)


class Kriging:
    """Resampling rows for every displacement on a 1 um grid up to ``max_um``: ``rows(g)`` moves each channel's
    target to ``y_c + g``. Computed once (a small solve per channel and displacement); displacement 0 is the
    identity, so a still probe's samples pass through unchanged."""

    def __init__(self, positions: np.ndarray, max_um: float):
        from scipy.spatial import cKDTree

        pos = np.asarray(positions, np.float64)
        c = pos.shape[0]
        k = min(KRIGING_NEIGHBOURS, c)
        self.n_grid = int(round(max_um / GRID_UM))
        shifts = np.arange(-self.n_grid, self.n_grid + 1) * GRID_UM
        targets = pos[None, :, :] + np.stack([np.zeros_like(shifts), shifts], axis=1)[:, None, :]  # (G, C, 2)
        dist, idx = cKDTree(pos).query(targets.reshape(-1, 2), k=k)  # nearest sources of each target
        dist, idx = dist.reshape(shifts.size, c, k), idx.reshape(shifts.size, c, k)
        src = pos[idx]  # (G, C, k, 2)
        kxx = np.exp(-np.linalg.norm(src[:, :, :, None, :] - src[:, :, None, :, :], axis=4) / KRIGING_SIGMA_UM)
        kxx += KRIGING_RIDGE * np.eye(k)
        kyx = np.exp(-dist / KRIGING_SIGMA_UM)  # (G, C, k)
        w = np.linalg.solve(kxx, kyx[..., None])[..., 0]
        w[self.n_grid] = 0.0
        w[self.n_grid, :, 0] = 1.0  # the identity at 0 (each channel is its own nearest source)
        idx[self.n_grid, :, 0] = np.arange(c)
        self.index = np.ascontiguousarray(idx, dtype=np.int64)
        self.weights = np.ascontiguousarray(w, dtype=np.float32)

    def grid(self, displacement_um: np.ndarray) -> np.ndarray:
        """Grid rows (C,) int64 of per-channel displacements, clipped to the grid."""
        g = np.rint(np.asarray(displacement_um) / GRID_UM).astype(np.int64)
        return np.clip(g, -self.n_grid, self.n_grid) + self.n_grid


@numba.njit(cache=True, nogil=True)
def _resample(src, dst, rows, index, weights):
    n, c = src.shape
    k = index.shape[2]
    for ch in range(c):
        g = rows[ch]
        for t in range(n):
            acc = np.float32(0.0)
            for j in range(k):
                acc += weights[g, ch, j] * src[t, index[g, ch, j]]
            dst[t, ch] = acc


@dataclass
class MotionState:
    """What the front end reports: the current displacement (um) per window and the windows' centres."""

    window_um: np.ndarray
    centres_um: np.ndarray
    updates: int


class _Motion:
    """The resampling shared by the schedule and the tracker: a piecewise-constant displacement per step."""

    def __init__(self, probe: Probe, sampling_rate: float, cfg: MotionConfig):
        self.cfg = cfg
        self.probe = probe
        self.depths = probe.positions_um[:, 1].astype(np.float64)
        self.step = max(1, int(round(cfg.step_s * sampling_rate)))
        self.kriging = Kriging(probe.positions_um, cfg.max_um)
        self.centres = spatial_windows(probe, cfg)
        self.window_disp = np.zeros(self.centres.size)
        self.updates = 0
        self._set(np.zeros(probe.n_channels))

    def _set(self, disp: np.ndarray) -> None:
        self.channel_disp = np.asarray(disp, np.float64)
        self.rows = self.kriging.grid(self.channel_disp)
        self.identity = bool(np.all(self.rows == self.kriging.n_grid))

    def apply(self, src: np.ndarray, dst: np.ndarray, first_sample: int = 0) -> None:
        """Resample ``src`` (n, C; its first row is sample ``first_sample``) into ``dst`` with the current
        displacement."""
        if self.identity:
            dst[:] = src
        else:
            _resample(src, dst, self.rows, self.kriging.index, self.kriging.weights)

    def state(self) -> MotionState:
        return MotionState(self.window_disp.copy(), self.centres.copy(), self.updates)

    def warmup(self) -> None:
        x = np.zeros((2, self.probe.n_channels), np.float32)
        _resample(x, x.copy(), self.kriging.grid(np.ones(self.probe.n_channels)), self.kriging.index,
                  self.kriging.weights)

    # the front end calls these; the schedule ignores the spikes
    def reset(self, first_sample: int = 0) -> None:
        self.window_disp[:] = 0.0
        self.updates = 0
        self._set(np.zeros(self.probe.n_channels))

    def observe(self, events: np.ndarray, waveforms: np.ndarray, noise: np.ndarray, snippets) -> None:
        pass

    def update(self, boundary: int) -> None:
        raise NotImplementedError


class MotionSchedule(_Motion):
    """A displacement known in advance: ``displacement(t_s) -> (n_windows,)`` um at the windows' centres, or a
    table of per-step values. Step k (samples from ``k * step``) uses the displacement at its start."""

    def __init__(self, probe: Probe, sampling_rate: float, cfg: MotionConfig, step_disp: np.ndarray):
        super().__init__(probe, sampling_rate, cfg)
        self.step_disp = np.asarray(step_disp, np.float64).reshape(-1, self.centres.size)  # (n_steps, n_windows)
        self.reset(0)

    def _at(self, k: int) -> None:
        k = int(np.clip(k, 0, self.step_disp.shape[0] - 1))
        self.window_disp = self.step_disp[k].copy()
        self._set(channel_displacement(self.window_disp, self.centres, self.depths))

    def reset(self, first_sample: int = 0) -> None:
        self.updates = 0
        self._at(first_sample // self.step)

    def at_spikes(self, samples: np.ndarray, channels: np.ndarray) -> np.ndarray:
        """The displacement (um) applied to each spike: at its step, at its channel's depth."""
        k = np.clip(np.asarray(samples) // self.step, 0, self.step_disp.shape[0] - 1)
        # the channels' displacement is linear in the windows': one row of weights (W,) per channel
        weights = np.stack([channel_displacement(e, self.centres, self.depths) for e in np.eye(self.centres.size)],
                           axis=1)
        return np.einsum("sw,sw->s", self.step_disp[k], weights[np.asarray(channels)])

    def update(self, boundary: int) -> None:
        self.updates += 1
        self._at(boundary // self.step)


class DepthHistogram:
    """Depth x amplitude histograms of spikes, on the grid the tracker registers on."""

    def __init__(self, probe: Probe, cfg: MotionConfig):
        y = probe.positions_um[:, 1]
        self.bin_um = float(cfg.bin_um)
        self.y0 = float(y.min()) - cfg.max_um - 3 * HIST_SMOOTH_UM
        self.n_y = int(np.ceil((float(y.max()) + cfg.max_um + 3 * HIST_SMOOTH_UM - self.y0) / self.bin_um)) + 1
        self.n_a = AMPLITUDE_BINS.size

    def bins(self, depth_um: np.ndarray, amplitude_noise: np.ndarray):
        yb = np.clip(np.rint((depth_um - self.y0) / self.bin_um).astype(np.int64), 0, self.n_y - 1)
        ab = np.clip(np.searchsorted(AMPLITUDE_BINS, np.log2(np.maximum(amplitude_noise, 1e-3))) - 1, 0,
                     self.n_a - 1)
        return yb, ab

    def smooth(self, h: np.ndarray) -> np.ndarray:
        """Gaussian smoothing along depth (axis -2)."""
        half = int(np.ceil(3 * HIST_SMOOTH_UM / self.bin_um))
        x = np.arange(-half, half + 1) * self.bin_um
        k = np.exp(-0.5 * (x / HIST_SMOOTH_UM) ** 2)
        k /= k.sum()
        out = np.zeros_like(h, dtype=np.float64)
        for i, v in enumerate(k):  # a short kernel: one shifted add per tap
            s = i - half
            if s >= 0:
                out[..., s:, :] += v * h[..., : h.shape[-2] - s, :]
            else:
                out[..., :s, :] += v * h[..., -s:, :]
        return out


def spike_depths(events: np.ndarray, waveforms: np.ndarray, noise: np.ndarray, snippets, positions: np.ndarray):
    """Depths (um, y) and peak amplitudes (noise units) of complete snippets, as the features locate them."""
    k = events.size
    xn = np.empty(waveforms.shape, np.float32)
    rel = np.empty((k, waveforms.shape[2], 2), np.float32)
    loc = np.empty((k, 2), np.float32)
    with np.errstate(divide="ignore"):
        inv = (1.0 / noise[1]).astype(np.float32)
    _prepare(np.ascontiguousarray(waveforms, np.float32), np.ascontiguousarray(events["channel"], np.int64),
             np.ascontiguousarray(snippets.channel_index, np.int64), inv,
             np.ascontiguousarray(positions, np.float32), np.ascontiguousarray(snippets.relative_positions, np.float32),
             np.float32(LOCATION_FLOOR), xn, rel, loc)
    amp = np.abs(events["amplitude"]) * inv[events["channel"]]
    return loc[:, 1].astype(np.float64), amp.astype(np.float64)


def reference_histogram(probe: Probe, cfg: MotionConfig, depths_um: np.ndarray, amplitudes: np.ndarray,
                        duration_s: float) -> np.ndarray:
    """The tracker's reference: spikes per second in each depth x amplitude bin, in the reference frame."""
    hist = DepthHistogram(probe, cfg)
    yb, ab = hist.bins(depths_um, amplitudes)
    h = np.zeros((hist.n_y, hist.n_a), np.float64)
    np.add.at(h, (yb, ab), 1.0)
    return (h / max(duration_s, 1e-9)).astype(np.float32)


class MotionTracker(_Motion):
    """The runtime's causal displacement estimate (see the module docstring).

    Parameters
    ----------
    reference : ndarray (n_y, n_a)
        The bundle's reference histogram (:func:`reference_histogram`).
    delay : int
        Samples from a spike's trough until the front end hands it in at the latest (its snippet's due); an update
        at boundary B counts the spikes whose troughs are before ``B - delay``, which have all been handed in by
        then whatever the chunking.
    noise_uV : ndarray (C,), optional
        The bundle's filtered noise per channel. The tracker looks at one corrected sample (as the detector sees
        them) every ``HEALTH_STRIDE_S`` (fixed sample indices, so chunk-invariant); an update leaves out the spikes
        whose peak channel was noisy over the step it closes (``noisy_channels``), counted in ``excluded``. None:
        no check.
    """

    def __init__(self, probe: Probe, sampling_rate: float, cfg: MotionConfig, reference: np.ndarray, delay: int,
                 noise_uV: np.ndarray | None = None):
        super().__init__(probe, sampling_rate, cfg)
        self.noise_uV = None if noise_uV is None else np.asarray(noise_uV, np.float32)
        self.stride = max(1, int(round(HEALTH_STRIDE_S * sampling_rate)))
        self._rows = np.zeros((self.step // self.stride + 2, probe.n_channels), np.float32)
        self.fs = float(sampling_rate)
        self.hist = DepthHistogram(probe, cfg)
        ref = np.asarray(reference, np.float64)
        if ref.shape != (self.hist.n_y, self.hist.n_a):
            raise ValueError(f"motion reference has shape {ref.shape}, expected {(self.hist.n_y, self.hist.n_a)}")
        self.ref = self.hist.smooth(ref)
        self.delay = int(delay) + 1
        self.max_shift = int(np.floor(cfg.max_um / self.hist.bin_um))
        depths_grid = self.hist.y0 + np.arange(self.hist.n_y) * self.hist.bin_um
        self.grid_weights = window_weights(depths_grid, self.centres, cfg.window_um)  # (n_y, W)
        self.decay_per_sample = 1.0 / (cfg.tau_s * self.fs)
        self.reset(0)

    def reset(self, first_sample: int = 0) -> None:
        super().reset(first_sample)
        self.acc = np.zeros((self.centres.size, self.hist.n_y, self.hist.n_a))
        self.acc_time = int(first_sample)  # acc holds spikes' weights as of this sample
        self._pending = []  # (trough, y bin, amplitude bin, peak channel) of spikes not yet counted
        self._prev = (int(first_sample), self.channel_disp.copy())  # the displacement before the last update
        self._n = 0  # rows of the current step's samples in _rows
        self.excluded = 0

    def apply(self, src: np.ndarray, dst: np.ndarray, first_sample: int = 0) -> None:
        super().apply(src, dst)
        if self.noise_uV is None:
            return
        rows = dst[(-first_sample) % self.stride::self.stride]  # as the detector sees them
        k = min(rows.shape[0], self._rows.shape[0] - self._n)  # a piece never crosses a step boundary
        self._rows[self._n:self._n + k] = rows[:k]
        self._n += k

    def observe(self, events: np.ndarray, waveforms: np.ndarray, noise: np.ndarray, snippets) -> None:
        """Spikes (deep events and their snippets, in the reference frame) handed in by the front end."""
        if events.size == 0:
            return
        y, amp = spike_depths(events, waveforms, noise, snippets, self.probe.positions_um)
        t = events["sample_index"]
        # back to where the spike was on the probe: the displacement applied at its trough, at its channel
        at, before = self._prev
        ch = events["channel"]
        raw = y + np.where(t < at, before[ch], self.channel_disp[ch])
        yb, ab = self.hist.bins(raw, amp)
        self._pending.append(np.stack([t, yb, ab, ch], axis=1))

    def update(self, boundary: int) -> None:
        """The displacement for the samples from ``boundary`` on."""
        until = boundary - self.delay
        pend = np.concatenate(self._pending) if self._pending else np.zeros((0, 4), np.int64)
        now = pend[pend[:, 0] < until]
        self._pending = [pend[pend[:, 0] >= until]] if pend.size else []
        if self.noise_uV is not None and self._n:
            noisy = noisy_channels(self._rows[:self._n], self.noise_uV)
            self._n = 0
            if now.size and noisy.any():
                keep = ~noisy[now[:, 3]]
                self.excluded += int(now.shape[0] - keep.sum())
                now = now[keep]
        self.acc *= np.exp(-(until - self.acc_time) * self.decay_per_sample)
        self.acc_time = until
        if now.size:
            w = np.exp(-(until - now[:, 0]) * self.decay_per_sample)
            for j in range(self.centres.size):
                np.add.at(self.acc[j], (now[:, 1], now[:, 2]), w * self.grid_weights[now[:, 1], j])
        disp = self.window_disp.copy()
        enough = self.acc.sum(axis=(1, 2)) >= MIN_SPIKES
        if enough.any():
            disp[enough] = self._register(self.hist.smooth(self.acc[enough]))
        self._prev = (boundary, self.channel_disp.copy())
        self.window_disp = disp
        self.updates += 1
        self._set(channel_displacement(disp, self.centres, self.depths))

    def _register(self, recent: np.ndarray) -> np.ndarray:
        """Per window (w, n_y, n_a): the shift (um) s maximising sum recent(y) ref(y - s), refined by a parabola
        through the peak."""
        m = self.max_shift
        n_w, n_y, n_a = recent.shape
        padded = np.pad(recent, ((0, 0), (m, m), (0, 0)))
        score = np.zeros((n_w, 2 * m + 1))
        for w in range(n_w):  # score[w, i]: the overlap at shift s = i - m (a few short correlations per update)
            for a in range(n_a):
                score[w] += np.correlate(padded[w, :, a], self.ref[:, a], mode="valid")
        i = np.argmax(score, axis=1)
        rows = np.arange(score.shape[0])
        inner = (i > 0) & (i < 2 * m)
        a = score[rows, np.maximum(i - 1, 0)]
        b = score[rows, i]
        c = score[rows, np.minimum(i + 1, 2 * m)]
        den = a - 2 * b + c
        off = np.where(inner & (den < 0), 0.5 * (a - c) / np.where(den < 0, den, -1.0), 0.0)
        return (i - m + off) * self.hist.bin_um
