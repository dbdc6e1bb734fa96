"""Collisions: subtract the labelled spikes, then look again (peeling, one pass).

Two neighbouring units that fire within a millisecond give one event: the
detector keeps the steeper slope within ``detect.radius_um``, and the other
spike is hidden under it. :class:`Peeler` keeps a copy of the filtered
stream, subtracts every labelled spike's template there (scaled and shifted
as it was fitted, on every channel), and runs a second detector over that
residual once no later spike can still change it. A spike it finds (at
least ``detect.amp_threshold`` deep, as the first pass's spikes) leaves when
a unit's template claims it by the candidates' rules (matched filter, scale,
residual limit), when no first-pass spike lies within ``DUPLICATE_SAMPLES``
and ``DUPLICATE_UM`` of it (what is left of a spike's own subtraction), and
when that unit has no first-pass spike within ``REFRACTORY_SAMPLES``.

A peeled spike leaves later than the others: the residual is final
``delay`` samples after the newest sample (the slowest event's wait, the
snippet's samples before the trough, and the fit's shift), and the second
detector then waits as the first does. Its ``distance`` is NaN, as for a
candidate. The state is a buffer of absolute sample positions, so chunking
does not change what is found.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np

from .assign import AMPLITUDE_RANGE
from .detect import GradientDetector
from .features import normalize_waveforms
from .snippets import SnippetExtractor
from .types import EVENT_DTYPE, SLOPE

DUPLICATE_SAMPLES = 1  # a peeled event this close to a first-pass spike ...
DUPLICATE_UM = 40.0  # ... and this near is what its subtraction left, not a spike
_NO_EVENTS = np.zeros(0, EVENT_DTYPE)
_NO_UNITS = np.zeros(0, np.int32)
REFRACTORY_SAMPLES = 45  # 1.5 ms at 30 kHz: a unit does not fire twice this close (scaled to the sampling rate)


@numba.njit(cache=True, nogil=True)
def _fits(xn, channels, units, channel_index, templates, amin, amax, max_shift, scale, shift):
    """Each labelled snippet's least-squares scale (clipped to [amin, amax]) and shift for its own unit."""
    t_len, n_k = xn.shape[1], xn.shape[2]
    for i in range(xn.shape[0]):
        u = units[i]
        scale[i] = 0.0
        shift[i] = 0
        if u < 0:
            continue
        c = channels[i]
        best = -np.inf
        for s in range(-max_shift, max_shift + 1):
            dot = 0.0
            nrm = 0.0
            for t in range(max(0, s), min(t_len, t_len + s)):
                for j in range(n_k):
                    w = templates[u, t - s, channel_index[c, j]]
                    dot += xn[i, t, j] * w
                    nrm += w * w
            if nrm <= 0.0:
                continue
            a = min(max(dot / nrm, amin), amax)
            g = 2.0 * a * dot - a * a * nrm
            if g > best:
                best = g
                scale[i] = a
                shift[i] = s


@numba.njit(cache=True, nogil=True)
def _add_templates(ring, mask, troughs, units, scale, shift, templates_uv, nbefore):
    """ring[t & mask] += scale x template (uV, every channel) for each spike, placed at its trough and shift."""
    t_len, n_ch = templates_uv.shape[1], templates_uv.shape[2]
    for i in range(troughs.shape[0]):
        u = units[i]
        if u < 0:
            continue
        t0 = troughs[i] - nbefore + shift[i]
        a = scale[i]
        for t in range(t_len):
            r = (t0 + t) & mask
            for c in range(n_ch):
                ring[r, c] += a * templates_uv[u, t, c]


@numba.njit(cache=True, nogil=True)
def _append(sig, sub, mask, stop, chunk, pad):
    """Samples stop.. into the signal ring; the template sums ``pad`` samples ahead of them start at zero."""
    for i in range(chunk.shape[0]):
        r = (stop + i) & mask
        z = (stop + pad + i) & mask
        for c in range(chunk.shape[1]):
            sig[r, c] = chunk[i, c]
            sub[z, c] = 0.0


@numba.njit(cache=True, nogil=True)
def _residual(sig, sub, mask, start, out):
    """out[i] = signal - template sum at sample start + i."""
    for i in range(out.shape[0]):
        r = (start + i) & mask
        for c in range(out.shape[1]):
            out[i, c] = sig[r, c] - sub[r, c]


class Peeler:
    """The second, residual pass of one stream (see the module docstring).

    Parameters
    ----------
    front : FrontEnd
        The stream's first pass (its configuration, probe, noise levels and snippet layout).
    templates : ndarray (n_units, T, C)
        The bundle's templates in uV.
    matcher : TemplateMatcher
        The first pass's template fit (noise-unit templates, units near each channel, gates).
    """

    def __init__(self, front, templates, matcher):
        cfg = front.config
        self.front = front
        self.matcher = matcher
        self.templates_uv = np.ascontiguousarray(templates, dtype=np.float32)
        self.noise = front.noise_levels
        # the second pass looks for spikes only (deep slopes): no candidates, no trough events
        spikes_only = replace(cfg.detect, candidate_threshold=0.0, trough_threshold=0.0)
        self.detector = GradientDetector(spikes_only, front.probe, front.sampling_rate, self.noise)
        self.snippets = SnippetExtractor(cfg.snippets, front.probe, front.sampling_rate, self.detector.event_ages)
        first = front.snippets
        self.nbefore = first.nbefore
        self.max_shift = matcher.max_shift
        # the residual at sample s is final once no spike still to come can reach it
        self.delay = int(max(first.nafter - 1, front.detector.max_event_age)) + self.nbefore + self.max_shift
        self._pad = self.templates_uv.shape[1] + self.max_shift  # room for a spike's samples still to come
        self.refractory = max(1, int(round(REFRACTORY_SAMPLES * front.sampling_rate / 30000.0)))
        # a peeled spike leaves at least nafter - 1 samples after its trough, when every first-pass spike up to
        # this far after it has left too
        self._ahead = first.nafter - 1 + self.nbefore + self.max_shift
        assert self._ahead >= DUPLICATE_SAMPLES
        self.positions = front.probe.positions_um
        self.amp_threshold = np.float32(cfg.detect.amp_threshold) * self.noise[1].astype(np.float32)
        self.n_peeled = 0  # over the stream's life, gaps included
        self.reset(0)

    def reset(self, first_sample: int = 0) -> None:
        self.detector.reset(first_sample)
        self.snippets.reset(first_sample)
        # the signal and the sum of subtracted templates apart (residual = signal - sum, whatever the chunking), in
        # rings indexed by absolute sample
        self._sig = None
        self._ring(self.delay + 2 * self._pad + 1024)
        self._start = int(first_sample)  # the first sample not yet handed to the second pass
        self._stop = int(first_sample)  # samples up to here have arrived
        self._recent = np.zeros((0, 3), np.int64)  # first-pass spikes still near the residual: (sample, channel, unit)

    def warmup(self) -> None:
        self.detector.warmup()
        self.snippets.warmup()
        k = self.front.snippets.k_channels
        xn = np.zeros((1, self.front.snippets.n_samples, k), np.float32)
        ch = np.zeros(1, np.int64)
        a, s = np.zeros(1, np.float32), np.zeros(1, np.int64)
        _fits(xn, ch, np.zeros(1, np.int32), self.matcher.channel_index, self.matcher.templates, AMPLITUDE_RANGE[0],
              AMPLITUDE_RANGE[1], self.max_shift, a, s)
        ring = np.zeros((2, self.templates_uv.shape[2]), np.float32)
        _add_templates(ring, 1, ch, np.full(1, -1, np.int32), a, s, self.templates_uv, self.nbefore)
        _append(ring, ring.copy(), 1, 0, ring[:1], 1)
        _residual(ring, ring, 1, 0, ring[:1].copy())

    def _ring(self, rows: int) -> None:
        """(Re)make the rings with at least ``rows`` rows, keeping the samples from ``_start`` on."""
        size = 1
        while size < rows:
            size *= 2
        sig = np.zeros((size, self.templates_uv.shape[2]), np.float32)
        sub = np.zeros_like(sig)
        if self._sig is not None:
            keep = np.arange(self._start, self._stop + self._pad)
            sig[keep & (size - 1)] = self._sig[keep & self._mask]
            sub[keep & (size - 1)] = self._sub[keep & self._mask]
        self._sig, self._sub, self._mask = sig, sub, size - 1

    def process(self, filtered: np.ndarray, spikes: np.ndarray, xn: np.ndarray | None, label: bool = True):
        """Add a filtered chunk and the first pass's spikes it completed; return the peeled spikes' (events, units).

        ``spikes`` are the first pass's emitted spikes (SPIKE_DTYPE, in emission
        order) and ``xn`` their snippets in noise units; those with a unit are
        subtracted. With ``label`` False (overload) the residual advances but
        nothing is labelled.
        """
        n = filtered.shape[0]
        end = self._stop + n
        if end + self._pad - self._start > self._mask + 1:
            self._ring(end + self._pad - self._start)
        _append(self._sig, self._sub, self._mask, self._stop, filtered, self._pad)
        self._stop = end
        if spikes.size and xn is not None:
            units = np.ascontiguousarray(spikes["unit"], dtype=np.int32)
            channels = spikes["channel"].astype(np.int64)
            scale = np.empty(spikes.size, np.float32)
            shift = np.empty(spikes.size, np.int64)
            _fits(np.ascontiguousarray(xn, dtype=np.float32), channels, units, self.matcher.channel_index,
                  self.matcher.templates, AMPLITUDE_RANGE[0], AMPLITUDE_RANGE[1], self.max_shift, scale, shift)
            _add_templates(self._sub, self._mask, spikes["sample_index"].astype(np.int64), units, scale, shift,
                           self.templates_uv, self.nbefore)
        if spikes.size:
            self._recent = np.concatenate([self._recent, np.stack(
                [spikes["sample_index"].astype(np.int64), spikes["channel"].astype(np.int64),
                 spikes["unit"].astype(np.int64)], axis=1)])
        final = max(self._start, end - self.delay)
        k = final - self._start
        if k == 0:
            return _NO_EVENTS, _NO_UNITS
        residual = np.empty((k, self._sig.shape[1]), np.float32)
        _residual(self._sig, self._sub, self._mask, self._start, residual)
        first = self._start
        self._start = final
        events = self.detector.process(residual)
        ev, wf, _ = self.snippets.process(residual, first, events)
        ev, unit = self._label(ev, wf) if label and ev.size else (ev[:0], _NO_UNITS)
        # first-pass spikes that no peeled spike still to come can sit near are forgotten
        horizon = final - self.snippets.nafter - self.detector.max_event_age - self.refractory - 1
        self._recent = self._recent[self._recent[:, 0] >= horizon]
        self.n_peeled += ev.size
        return ev, unit

    def _label(self, ev: np.ndarray, wf: np.ndarray):
        """The second pass's events that are spikes: deep slopes a template claims that are no first-pass spike's."""
        deep = (np.abs(ev["amplitude"]) >= self.amp_threshold[ev["channel"]]) & (ev["kind"] == SLOPE)
        ev, wf = ev[deep], wf[deep]
        if ev.size == 0:
            return ev, np.zeros(0, np.int32)
        channels = ev["channel"].astype(np.int64)
        xn = normalize_waveforms(wf, channels, self.matcher.channel_index, self.noise[1])
        unit = np.zeros(ev.size, np.int32)
        self.matcher.match(xn, channels, self.matcher.near_units[channels], unit)
        keep = (unit >= 0) & self._new(ev["sample_index"].astype(np.int64), channels, unit)
        return ev[keep], unit[keep]

    def _new(self, samples: np.ndarray, channels: np.ndarray, units: np.ndarray) -> np.ndarray:
        """Not what a first-pass spike's subtraction left, and not within its own unit's refractory period.

        Only first-pass spikes up to ``self._ahead`` samples after the peeled
        one are certain to be known whatever the chunking; later ones are not
        looked at, so the answer is the same for any chunking.
        """
        r = self._recent
        if r.shape[0] == 0:
            return np.ones(samples.size, bool)
        lag = r[None, :, 0] - samples[:, None]
        r = r[None]
        dt = np.where(lag <= self._ahead, np.abs(lag), np.iinfo(np.int64).max)
        um = np.linalg.norm(self.positions[channels][:, None] - self.positions[r[0, :, 1]][None], axis=2)
        twin = (dt <= DUPLICATE_SAMPLES) & (um <= DUPLICATE_UM)
        same = (dt <= self.refractory) & (units[:, None] == r[:, :, 2])
        return ~(twin | same).any(axis=1)
