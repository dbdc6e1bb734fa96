"""Collisions: subtract the labelled spikes, then look again (peeling, one pass).

Two neighbouring units that fire within a millisecond give one event: the
detector keeps the steeper slope within ``detect.radius_um``, and the other
spike is hidden under it. :class:`Peeler` holds the filtered samples that are
not final yet, subtracts every labelled spike's template from them (scaled
and shifted as it was fitted, on every channel), and runs a second,
spikes-only detector over that
residual once no later spike can still change it. A spike it finds (at
least ``detect.amp_threshold`` deep, as the first pass's spikes) leaves when
a unit's template claims it by the candidates' rules (matched filter, scale,
residual limit), when no first-pass spike lies within ``DUPLICATE_SAMPLES``
and ``DUPLICATE_UM`` of it (what is left of a spike's own subtraction), and
when that unit has no first-pass spike within ``REFRACTORY_SAMPLES``.

With ``assign.search`` the residual is searched once more, for spikes too
weak for the detector's channel-by-channel thresholds: every unit's template
(on its own channels) runs over it as a matched filter, and a match leaves
when its matched filter reaches ``assign.template_min_snr`` at a scale of at
least ``assign.template_min_scale``, is the best of every unit within
``SEARCH_COMPETE_UM`` over ``SEARCH_PEAK_SAMPLES`` either side, no known
event (first pass, peeled, matched before, or a tail) lies within
``DUPLICATE_SAMPLES`` and ``DUPLICATE_UM`` of it (the same event seen
again), its unit has no known spike from ``REFRACTORY_SAMPLES`` before it
to ``SAME_UNIT_AFTER`` after, and its
template's fit to the residual passes the candidates' residual and
footprint rules (``assign.candidate_max_residual``,
``assign.candidate_max_footprint``): what a subtraction left, or the late
phase of a spike past its template's end, correlates with a small
template but is not explained by it, while a spike that collided with
a known one is. Its ``kind`` is MATCH. Units whose template at scale
``template_min_scale`` is still ``detect.amp_threshold`` deep are not
searched: the detector always finds their spikes.

A peeled spike leaves later than the others: the residual is final
``delay`` samples after the newest sample (the slowest event's wait, the
snippet's samples before the trough, and the fit's shift), and the second
detector then waits as the first does. Its ``distance`` is NaN, as for a
candidate. A sample's templates are subtracted in the order their spikes
were emitted, whatever the chunking, so chunking does not change what is
found (to the last bit).
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np

from .assign import AMPLITUDE_RANGE, padded_rows, shifted_fit, template_channels
from .detect import GradientDetector
from .features import normalize_waveforms
from .snippets import SnippetExtractor
from .types import EVENT_DTYPE, MATCH, TAIL

DUPLICATE_SAMPLES = 1  # a peeled event this close to a first-pass spike ...
DUPLICATE_UM = 40.0  # ... and this near is what its subtraction left, not a spike
_NO_EVENTS = np.zeros(0, EVENT_DTYPE)
_NO_UNITS = np.zeros(0, np.int32)
_NO_CONF = np.zeros(0, np.float32)
_PENDING = np.dtype([("start", np.int64), ("unit", np.int32), ("scale", np.float32)])
REFRACTORY_SAMPLES = 45  # 1.5 ms at 30 kHz: a unit does not fire twice this close (scaled to the sampling rate)
# the search (samples at 30 kHz, scaled to the sampling rate): a match is the best within SEARCH_PEAK_SAMPLES of
# every unit whose peak channel lies within SEARCH_COMPETE_UM, and its unit has no known spike from
# REFRACTORY_SAMPLES before it to SAME_UNIT_AFTER after (measured on tools/compare.py's recordings)
SEARCH_PEAK_SAMPLES = 20
SEARCH_COMPETE_UM = 60.0
SEARCH_ENERGY = 0.97  # the share of a template's energy the matched filter keeps (channels, then samples)
SAME_UNIT_AFTER = 10
_FIRST_PASS, _LATER = 0, 1  # where a known spike came from (the second pass's rules look at the first pass's only)
_TILE = 256  # window starts per block of the matched filter


@numba.njit(cache=True, nogil=True)
def _fits(xn, channels, units, channel_index, templates, amin, amax, max_shift, scale, shift):
    """Each labelled snippet's least-squares scale (clipped to [amin, amax]) and shift for its own unit."""
    for i in range(xn.shape[0]):
        u = units[i]
        scale[i] = 0.0
        shift[i] = 0
        if u < 0:
            continue
        best = -np.inf
        for s in range(-max_shift, max_shift + 1):
            dot, nrm = shifted_fit(xn[i], templates, u, s, channel_index, channels[i])
            if nrm <= 0.0:
                continue
            a = min(max(dot / nrm, amin), amax)
            g = 2.0 * a * dot - a * a * nrm
            if g > best:
                best = g
                scale[i] = a
                shift[i] = s


@numba.njit(cache=True, nogil=True)
def _subtract(residual, first, starts, units, scale, templates_uv, unit_channels, n_unit_channels):
    """residual[t - first] -= scale x template (uV, on the unit's ``unit_channels``: the others are 0) where each
    pending spike's template, starting at sample ``starts``, overlaps rows first.. of ``residual``; spikes in the
    order they were emitted."""
    t_len = templates_uv.shape[1]
    n = residual.shape[0]
    for i in range(starts.shape[0]):
        u = units[i]
        a = scale[i]
        for t in range(max(0, first - starts[i]), min(t_len, first + n - starts[i])):
            r = starts[i] + t - first
            for j in range(n_unit_channels[u]):
                c = unit_channels[u, j]
                residual[r, c] -= a * templates_uv[u, t, c]


@numba.njit(cache=True, nogil=True)
def _match_filter(head, residual, inv_noise, used, slot, n_channels, templates, tau0, tau1, inv_norm, out):
    """out[u, t] = <x[t + tau, c], templates[u, tau, j]> / |templates[u]| over tau0 <= tau < tau1 and the first
    ``n_channels[u]`` slots j (channel c = used[slot[u, j]]), where x is ``head`` then ``residual`` (rows of
    samples, uV) times ``inv_noise``, and zero past their end.

    Tile by tile of window starts, the used channels are copied channel-major into a buffer that stays in
    cache, so the innermost loop runs over contiguous samples (vectorised)."""
    n = out.shape[1]
    n_head = head.shape[0]
    n_rows = n_head + residual.shape[0]
    buf = np.empty((used.shape[0], min(_TILE, n) + tau1), np.float32)  # every column is written before it is read
    for b0 in range(0, n, _TILE):
        b1 = min(b0 + _TILE, n)
        for i in range(b1 - b0 + tau1):
            r = b0 + i
            if r < n_head:
                for q in range(used.shape[0]):
                    buf[q, i] = head[r, used[q]] * inv_noise[used[q]]
            elif r < n_rows:
                for q in range(used.shape[0]):
                    buf[q, i] = residual[r - n_head, used[q]] * inv_noise[used[q]]
            else:
                for q in range(used.shape[0]):
                    buf[q, i] = 0.0
        width = b1 - b0
        for u in range(templates.shape[0]):
            row = out[u, b0:b1]
            row[:] = 0.0
            n_k = n_channels[u]  # locals and slices, or LLVM does not vectorise the inner loop (6x slower)
            inv = inv_norm[u]
            for tau in range(tau0, tau1):
                for j in range(n_k):
                    w = templates[u, tau, j] * inv
                    src = buf[slot[u, j], tau : tau + width]
                    for t in range(width):  # contiguous: vectorises
                        row[t] += src[t] * w


@numba.njit(cache=True, nogil=True)
def _best_matches(z, z0, d0, d1, near, half, gate, out_t, out_u):
    """Matches decided for window starts d0..d1-1: z[u, t - z0] >= ``gate`` and the largest of the units
    ``near[u]`` within ``half`` samples (ties go to the earlier start, then the lower unit); returns how many."""
    n = 0
    n_z = z.shape[1]
    for t in range(max(d0, z0), min(d1, z0 + n_z)):
        for u in range(z.shape[0]):
            v = z[u, t - z0]
            if v < gate:
                continue
            ok = True
            for m in range(near.shape[1]):
                w_u = near[u, m]
                if w_u < 0:
                    break
                for dt in range(-half, half + 1):
                    i = t + dt - z0
                    if i < 0 or i >= n_z:
                        continue
                    w = z[w_u, i]
                    if w > v or (w == v and (dt < 0 or (dt == 0 and w_u < u))):
                        ok = False
                        break
                if not ok:
                    break
            if ok and n < out_t.shape[0]:
                out_t[n] = t
                out_u[n] = u
                n += 1
    return n


@numba.njit(cache=True, nogil=True, inline="always")
def _clash(dt, same_unit, d2, near_before, near_after, near_um, same_before, same_after):
    """A known spike ``dt`` samples after a new one (``d2``: squared distance in um) rules it out: the same unit
    from ``same_before`` samples before to ``same_after`` after, or any unit within ``near_um`` from
    ``near_before`` before to ``near_after`` after."""
    if same_unit and -same_before <= dt <= same_after:
        return True
    return -near_before <= dt <= near_after and d2 <= near_um * near_um


@numba.njit(cache=True, nogil=True)
def _clear(samples, channels, units, r_samples, r_channels, r_units, positions, near_before, near_after, near_um,
           same_before, same_after, sequential, out):
    """out[i] (in: spike i is still in): no known spike (``r_*``, sorted by sample) rules spike i out
    (:func:`_clash`); with ``sequential``, nor does any spike kept before it (``samples`` in time order)."""
    lo = max(near_before, same_before)
    hi = max(near_after, same_after)
    for i in range(samples.shape[0]):
        s = samples[i]
        px = positions[channels[i], 0]
        py = positions[channels[i], 1]
        ok = out[i]
        j = np.searchsorted(r_samples, s - lo)
        while ok and j < r_samples.shape[0] and r_samples[j] <= s + hi:
            d2 = (positions[r_channels[j], 0] - px) ** 2 + (positions[r_channels[j], 1] - py) ** 2
            ok = not _clash(r_samples[j] - s, r_units[j] == units[i], d2, near_before, near_after, near_um,
                            same_before, same_after)
            j += 1
        q = 0
        while sequential and ok and q < i:
            if out[q]:
                d2 = (positions[channels[q], 0] - px) ** 2 + (positions[channels[q], 1] - py) ** 2
                ok = not _clash(samples[q] - s, units[q] == units[i], d2, near_before, near_after, near_um,
                                same_before, same_after)
            q += 1
        out[i] = ok


def _last_rows(before: np.ndarray, block: np.ndarray, keep: int) -> np.ndarray:
    """The last ``keep`` rows of ``before`` followed by ``block`` (a new array; only what is kept is copied)."""
    if keep <= block.shape[0]:
        return block[block.shape[0] - keep :].copy()
    return np.concatenate([before[before.shape[0] - (keep - block.shape[0]) :], block])


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
        self._unit_ch, self._n_unit_ch = template_channels(self.templates_uv)  # subtraction touches only these
        self.noise = front.noise_levels
        # the second pass looks for spikes only (deep slopes): no candidates, no trough events
        spikes_only = replace(cfg.detect, candidate_threshold=0.0, trough_threshold=0.0)
        self.detector = GradientDetector(spikes_only, front.probe, front.sampling_rate, self.noise)
        self.snippets = SnippetExtractor(cfg.snippets, front.probe, front.sampling_rate, self.detector.event_ages)
        first = front.snippets
        self.nbefore = first.nbefore
        self.max_shift = matcher.max_shift
        # the residual at sample s is final once no spike still to come can reach it
        self.delay = first.max_wait + self.nbefore + self.max_shift
        self.refractory = max(1, int(round(REFRACTORY_SAMPLES * front.sampling_rate / 30000.0)))
        # a peeled spike leaves at least nafter - 1 samples after its trough, when every first-pass spike up to
        # this far after it has left too
        self._ahead = first.nafter - 1 + self.nbefore + self.max_shift
        assert self._ahead >= DUPLICATE_SAMPLES
        self.positions = front.probe.positions_um
        self.n_peeled = 0  # over the stream's life, gaps included (the search's matches too)
        self.n_matched = 0  # of which the search found
        self.search = bool(cfg.assign.search)
        self._init_search(front, matcher)
        self.reset(0)

    def _init_search(self, front, matcher) -> None:
        def samples(n):
            return max(1, int(round(n * front.sampling_rate / 30000.0)))

        self.peak_half = samples(SEARCH_PEAK_SAMPLES)
        self.same_unit_after = samples(SAME_UNIT_AFTER)
        tm = matcher.templates  # (U, T, C), noise units
        # a unit whose template at the smallest scale a match may have is still amp_threshold deep is always the
        # detector's spike: only the others can hide under its thresholds, and only they are searched
        size = np.abs(tm).max(axis=(1, 2)) if tm.shape[0] else np.zeros(0)
        self._search_units = np.flatnonzero(size * matcher.min_scale < front.config.detect.amp_threshold)
        tm = tm[self._search_units]
        self._peak = matcher.peak[self._search_units]
        self._search_ch = np.ascontiguousarray(matcher.channel_index[self._peak])  # (U, K): each unit's own channels
        tmk = np.take_along_axis(tm, self._search_ch[:, None, :], axis=2).astype(np.float64)  # (U, T, K)
        # only what carries the energy (cost, not accuracy): each unit's channels holding SEARCH_ENERGY of its
        # template's energy, over the samples (the same for every unit) holding SEARCH_ENERGY of all of them
        energy = tmk ** 2
        order = np.argsort(-energy.sum(axis=1), axis=1, kind="stable")
        self._search_ch = np.ascontiguousarray(np.take_along_axis(self._search_ch, order, axis=1))
        tmk = np.take_along_axis(tmk, order[:, None, :], axis=2)
        energy = tmk ** 2
        per_ch = np.cumsum(energy.sum(axis=1), axis=1)
        total = np.maximum(per_ch[:, -1:], 1e-12)
        self._search_nk = np.minimum((per_ch / total < SEARCH_ENERGY).sum(axis=1) + 1, tmk.shape[2]).astype(np.int64)
        profile = energy.sum(axis=(0, 2))
        lo = hi = int(np.argmax(profile)) if profile.size else 0
        while profile.size and profile[lo:hi + 1].sum() < SEARCH_ENERGY * profile.sum():
            if hi + 1 < profile.size and (lo == 0 or profile[hi + 1] >= profile[lo - 1]):
                hi += 1
            else:
                lo -= 1
        self._search_tau = (lo, hi + 1)
        kept = np.zeros_like(tmk)
        for u in range(tmk.shape[0]):
            kept[u, lo : hi + 1, : self._search_nk[u]] = tmk[u, lo : hi + 1, : self._search_nk[u]]
        self._search_tm = np.ascontiguousarray(kept, dtype=np.float32)
        # the channels the matched filters read, and each unit's channels as places in that list
        mask = np.arange(self._search_ch.shape[1])[None, :] < self._search_nk[:, None]
        self._search_used = np.unique(self._search_ch[mask]).astype(np.int64)
        self._search_slot = np.searchsorted(self._search_used, self._search_ch).astype(np.int64)
        self._search_slot[~mask] = 0
        nrm = np.sqrt((kept ** 2).sum(axis=(1, 2)))
        self._inv_norm = np.where(nrm > 0, 1.0 / np.maximum(nrm, 1e-12), 0.0).astype(np.float32)
        xy = self.positions[self._peak]
        d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(axis=2))
        self._near = padded_rows([np.flatnonzero(row <= SEARCH_COMPETE_UM) for row in d], np.int64)
        self._inv_noise = (1.0 / self.noise[1]).astype(np.float32)
        # a match at window start t is decided once the matched filters reach t + peak_half and every spike found
        # elsewhere up to its trough + same_unit_after has been found
        t_len = tm.shape[1]
        self._search_lag = max(t_len - 1 + self.peak_half, self.snippets.max_wait + self.nbefore + self.same_unit_after)

    @property
    def max_wait(self) -> int:
        """The most samples from a peeled spike's (or a match's) trough to the end of the chunk it leaves with,
        less that chunk's own length."""
        wait = self.delay + self.snippets.max_wait
        if self.search:
            wait = max(wait, self.delay + self._search_lag - self.nbefore)
        return wait

    def reset(self, first_sample: int = 0) -> None:
        self.detector.reset(first_sample)
        self.snippets.reset(first_sample)
        self._open = np.zeros((0, self.templates_uv.shape[2]), np.float32)  # signal not yet handed on
        self._start = int(first_sample)  # the first sample not yet handed to the second pass
        self._pending = np.zeros(0, _PENDING)  # labelled spikes whose template still reaches unreleased samples
        # spikes still near the residual: (sample, channel, unit, _FIRST_PASS or _LATER)
        self._recent = np.zeros((0, 4), np.int64)
        self._z = np.zeros((self._search_units.size, 0), np.float32)  # the matched filters from _z_start on
        self._z_start = self._z_next = self._d_next = int(first_sample)
        self._hist = np.zeros((0, self.templates_uv.shape[2]), np.float32)  # residual (uV) from _d_next on
        self._skipped = 0  # samples skipped (:meth:`skip`) since the last chunk processed

    @property
    def next_sample(self) -> int:
        """The sample the next chunk must start with."""
        return self._start + self._open.shape[0] + self._skipped

    def skip(self, n_samples: int) -> None:
        """Let ``n_samples`` pass unseen (an overload: nothing was labelled, so nothing would be subtracted); the
        next chunk starts the stream afresh, as after a gap."""
        self._skipped += int(n_samples)

    def warmup(self) -> None:
        self.detector.warmup()
        self.snippets.warmup()
        k = self.front.snippets.k_channels
        xn = np.zeros((1, self.front.snippets.n_samples, k), np.float32)
        ch = np.zeros(1, np.int64)
        a, s = np.zeros(1, np.float32), np.zeros(1, np.int64)
        none = np.zeros(0, np.int32)  # no spike: the kernels compile without reading a unit (there may be none)
        _fits(xn[:0], ch[:0], none, self.matcher.channel_index, self.matcher.templates, AMPLITUDE_RANGE[0],
              AMPLITUDE_RANGE[1], self.max_shift, a[:0], s[:0])
        self.matcher.match(xn, ch, self.matcher.near_units[ch], np.zeros(1, np.int32))  # the second pass's labels
        _subtract(np.zeros((2, self.templates_uv.shape[2]), np.float32), 0, ch[:0], none, a[:0], self.templates_uv,
                  self._unit_ch, self._n_unit_ch)
        _clear(ch, ch, ch, ch, ch, ch, self.positions, 1, 1, 1.0, 1, 1, True, np.zeros(1, np.bool_))
        z = np.zeros((self._search_tm.shape[0], 1), np.float32)
        rows = np.zeros((1, self.templates_uv.shape[2]), np.float32)
        _match_filter(rows, rows, self._inv_noise, self._search_used, self._search_slot, self._search_nk,
                      self._search_tm, *self._search_tau, self._inv_norm, z)
        _best_matches(z, 0, 0, 1, self._near, 1, np.float32(np.inf), ch, ch)  # the gate as the search passes it

    def process(self, filtered: np.ndarray, spikes: np.ndarray, xn: np.ndarray | None, tails: np.ndarray):
        """Add a filtered chunk and the first pass's spikes it completed; return the peeled spikes' (events, units,
        confidences).

        ``spikes`` are the first pass's emitted spikes (SPIKE_DTYPE, in emission
        order) and ``xn`` their snippets in noise units; those with a unit are
        subtracted. ``tails`` are the events the first pass dropped as tails
        (their late phase lies past the template's end, so the second pass
        sees them again: they are not new). Chunks follow one another from
        :attr:`next_sample`; after a gap :meth:`reset` starts the stream
        again, as the first chunk after :meth:`skip` does.
        """
        if self._skipped:
            self.reset(self.next_sample)
        end = self.next_sample + filtered.shape[0]
        if spikes.size and xn is not None and (spikes["unit"] >= 0).any():
            lab = spikes[spikes["unit"] >= 0]
            xl = xn[spikes["unit"] >= 0]
            units = lab["unit"].astype(np.int32)
            scale = np.empty(lab.size, np.float32)
            shift = np.empty(lab.size, np.int64)
            _fits(np.ascontiguousarray(xl, dtype=np.float32), lab["channel"].astype(np.int64), units,
                  self.matcher.channel_index, self.matcher.templates, AMPLITUDE_RANGE[0], AMPLITUDE_RANGE[1],
                  self.max_shift, scale, shift)
            new = np.empty(lab.size, _PENDING)
            new["start"] = lab["sample_index"] - self.nbefore + shift
            new["unit"] = units
            new["scale"] = scale
            self._pending = np.concatenate([self._pending, new])
        self._remember(spikes, spikes["unit"], _FIRST_PASS)
        self._remember(tails, TAIL, _FIRST_PASS)
        final = max(self._start, end - self.delay)
        k = final - self._start
        if k == 0:
            self._open = np.concatenate([self._open, filtered])
            return _NO_EVENTS, _NO_UNITS, _NO_CONF
        residual = np.concatenate([self._open, filtered])  # a fresh array: its first k rows are subtracted in place
        self._open = residual[k:].copy()
        residual = residual[:k]
        first = self._start
        p = self._pending
        if p.size:
            _subtract(residual, first, np.ascontiguousarray(p["start"]), np.ascontiguousarray(p["unit"]),
                      np.ascontiguousarray(p["scale"]), self.templates_uv, self._unit_ch, self._n_unit_ch)
            self._pending = p[p["start"] + self.templates_uv.shape[1] > final]
        self._start = final
        events = self.detector.process(residual)
        ev, wf, _ = self.snippets.process(residual, first, events)
        ev, unit, conf = self._label(ev, wf) if ev.size else (ev[:0], _NO_UNITS, _NO_CONF)
        self._remember(ev, unit, _LATER)
        if self.search:
            mev, munit, mconf = self._search(residual, final)
            self._remember(mev, munit, _LATER)
            if mev.size:
                ev, unit, conf = np.concatenate([ev, mev]), np.concatenate([unit, munit]), np.concatenate([conf, mconf])
            self.n_matched += mev.size
        # spikes that no peeled spike or match still to come can sit near are forgotten
        horizon = final - self.snippets.max_wait - self.refractory - 1
        if self.search:
            horizon = min(horizon, self._d_next + self.nbefore - self.refractory - 1)
        self._recent = self._recent[self._recent[:, 0] >= horizon]
        self.n_peeled += ev.size
        return ev, unit, conf

    def _remember(self, ev: np.ndarray, unit, source: int) -> None:
        """Events (spikes or tails; ``unit`` per event, or one for all) become known to the rules: ``source``
        _FIRST_PASS for the second pass's, _LATER (peeled spikes, matches) for the search's only."""
        if ev.size:
            known = np.empty((ev.size, 4), np.int64)
            known[:, 0] = ev["sample_index"]
            known[:, 1] = ev["channel"]
            known[:, 2] = unit
            known[:, 3] = source
            self._recent = np.concatenate([self._recent, known])

    def _search(self, residual: np.ndarray, final: int):
        """Run the searched units' templates over the residual up to ``final``; return the matches decided
        (events, units, confidences: each against noise alone, :meth:`TemplateMatcher.match`).

        Window starts are decided in stream order, ``_search_lag`` samples
        behind ``final``, so every chunking decides the same matches.
        """
        t_len = self._search_tm.shape[1]
        # the residual from _d_next (the first undecided window start) on: self._hist, then this block; the
        # matched filters' next window start _z_next is never earlier, so their head is hist's last rows
        d_lo = self._d_next
        hist = self._hist
        head = hist[hist.shape[0] - (final - residual.shape[0] - self._z_next) :]
        z_hi = final - t_len + 1  # the last window start whose samples are all final, plus one
        m = z_hi - self._z_next
        if m > 0:
            # whole SIMD vectors: a few more window starts over zeros, computed and dropped (1.5x faster at 30
            # samples a chunk than a scalar remainder)
            z = np.empty((self._z.shape[0], m + (-m % 8)), np.float32)
            _match_filter(head, residual, self._inv_noise, self._search_used, self._search_slot,
                          self._search_nk, self._search_tm, *self._search_tau, self._inv_norm, z)
            self._z = np.concatenate([self._z, z[:, :m]], axis=1)
            self._z_next = z_hi
        d_hi = final - self._search_lag
        self._hist = _last_rows(hist, residual, final - max(d_lo, d_hi))
        if d_hi <= d_lo:
            return _NO_EVENTS, _NO_UNITS, _NO_CONF
        self._d_next = d_hi
        n_u = self._z.shape[0]
        n = 0
        if n_u:
            out_t = np.empty(n_u * ((d_hi - d_lo) // (self.peak_half + 1) + 1), np.int64)
            out_u = np.empty(out_t.size, np.int64)
            n = _best_matches(self._z, self._z_start, d_lo, d_hi, self._near, self.peak_half,
                              np.float32(self.matcher.min_snr), out_t, out_u)
        if n:
            t, u = out_t[:n], out_u[:n]
            scale = self._z[u, t - self._z_start] * self._inv_norm[u]
        cut = d_hi - self.peak_half - self._z_start  # the matched filters a later decision can still look at
        if cut > 0:
            self._z = self._z[:, cut:]  # a view: the next call's concatenation copies it
            self._z_start += cut
        if n == 0:
            return _NO_EVENTS, _NO_UNITS, _NO_CONF
        ok = (scale >= self.matcher.min_scale) & (scale <= AMPLITUDE_RANGE[1])
        t, u, scale = t[ok], u[ok], scale[ok]
        if t.size == 0:
            return _NO_EVENTS, _NO_UNITS, _NO_CONF
        samples = t + self.nbefore
        channels = self._peak[u]
        u = self._search_units[u]  # the searched units' numbers
        # the candidates' residual rule, on the residual's snippet at the match (the matched filter was the gate)
        cix = self.matcher.channel_index[channels]  # (k, K)
        lo = int(t.min()) - d_lo  # the residual from the earliest match on: hist's last rows, then the block
        src = np.concatenate([hist[lo:], residual]) if lo < hist.shape[0] else residual[lo - hist.shape[0] :]
        wf = src[(t - d_lo - lo)[:, None, None] + np.arange(t_len)[None, :, None], cix[:, None, :]]
        xn = (wf * self._inv_noise[cix][:, None, :]).astype(np.float32)
        fit = np.zeros(t.size, np.int32)
        conf = np.empty(t.size, np.float32)
        self.matcher.match(xn, channels, u[:, None].astype(np.int32), fit, gates=False, confidence=conf)
        r = self._recent[np.argsort(self._recent[:, 0], kind="stable")]
        keep = fit >= 0
        # a known event in the same place (a tail, what a subtraction left) or its own unit's spike rules it out
        _clear(samples, channels, u, np.ascontiguousarray(r[:, 0]), np.ascontiguousarray(r[:, 1]),
               np.ascontiguousarray(r[:, 2]), self.positions, DUPLICATE_SAMPLES, DUPLICATE_SAMPLES, DUPLICATE_UM,
               self.refractory, self.same_unit_after, True, keep)
        ev = np.zeros(int(keep.sum()), EVENT_DTYPE)
        ev["sample_index"] = samples[keep]
        ev["channel"] = channels[keep]
        ev["amplitude"] = scale[keep] * self.templates_uv[u[keep], self.nbefore, channels[keep]]
        ev["kind"] = MATCH
        return ev, u[keep].astype(np.int32), conf[keep]

    def _label(self, ev: np.ndarray, wf: np.ndarray):
        """The second pass's events that are spikes: deep slopes a template claims that are no first-pass spike's."""
        deep = self.front.spike_mask(ev)  # the first pass's rule for a spike (its detector found deep slopes)
        ev, wf = ev[deep], wf[deep]
        if ev.size == 0:
            return ev, _NO_UNITS, _NO_CONF
        channels = ev["channel"].astype(np.int64)
        xn = normalize_waveforms(wf, channels, self.matcher.channel_index, self.noise[1])
        unit = np.zeros(ev.size, np.int32)
        conf = np.empty(ev.size, np.float32)
        self.matcher.match(xn, channels, self.matcher.near_units[channels], unit, confidence=conf)
        keep = (unit >= 0) & self._new(ev["sample_index"].astype(np.int64), channels, unit)
        return ev[keep], unit[keep], conf[keep]

    def _new(self, samples: np.ndarray, channels: np.ndarray, units: np.ndarray) -> np.ndarray:
        """Not what a first-pass spike's subtraction left, and not within its own unit's refractory period.

        Only first-pass spikes up to ``self._ahead`` samples after the peeled
        one are certain to be known whatever the chunking; later ones are not
        looked at, so the answer is the same for any chunking.
        """
        r = self._recent[self._recent[:, 3] == _FIRST_PASS]
        r = r[np.argsort(r[:, 0], kind="stable")]
        out = np.ones(samples.size, np.bool_)
        _clear(samples, channels, units.astype(np.int64), np.ascontiguousarray(r[:, 0]),
               np.ascontiguousarray(r[:, 1]), np.ascontiguousarray(r[:, 2]), self.positions, DUPLICATE_SAMPLES,
               min(DUPLICATE_SAMPLES, self._ahead), DUPLICATE_UM, self.refractory, min(self.refractory, self._ahead),
               False, out)
        return out
