"""Labelling: nearest centroid with a rejection radius, then the unit whose template fits best.

A unit may own several centroids (clusters merged into one unit at training
keep their own centroids, so a unit whose spikes peak on two channels is not
forced into one blob). A spike farther from its nearest centroid than that
centroid's radius is "unassigned" (-1), never guessed.

The nearest centroids short-list the units a spike may belong to (the units
of its ``template_candidates`` nearest centroids). A :class:`TemplateMatcher`
then picks, among them, the unit whose mean waveform (the bundle's template,
scaled by the best amplitude in ``AMPLITUDE_RANGE`` and shifted by up to
``template_max_shift`` samples) explains most of the snippet's energy in noise
units, less ``amplitude_prior`` x (a - 1)^2 |T|^2 for a scale a away from the
template's own size. The spike stays unassigned unless that template also passes as a
matched filter, ``<x, T> / |T|`` >= ``template_min_snr`` (noise alone gives
0 +/- 1), at a scale ``<x, T> / |T|^2`` >= ``template_min_scale`` (a small
neighbour's spike does not pass for a big unit's). This gate is what lets
the detector hand over shallow candidates (``detect.candidate_threshold``):
the ones no template claims are not spikes. A candidate must also leave at
most ``candidate_max_residual`` mean squared residual per sample (noise
alone: 1): the tail of a big unit's spike, a millisecond after its trough,
can correlate with a small neighbour's template as well as that unit's own
spikes do, but it is not explained by it. Nor may it leave its unit's
footprint: the residual, projected channel by channel onto the template's
time course (its peak channel's, of unit norm), may hold at most
``candidate_max_footprint`` per channel (noise alone: 1) plus
``FOOTPRINT_OF_FIT`` of the fit's energy. A weak neighbour with no unit of
its own, a few tens of micrometres away, has the same time course on
channels in other proportions: the whole snippet's residual barely sees it
(a few hundred samples of noise), these K projections do.
docs/configuration.md ([assign]) has the figures.

A spike's late phase (its repolarisation, and the causal filter's ringing
after it) can cross the detector's threshold a few tenths of a millisecond
after the trough, on the spike's own channels: the same spike, detected
again. :class:`LatePhase` drops an event that an earlier labelled spike's
template explains: the event minus what the template, placed at that
spike's trough, predicts at the event's channel and time is no longer deep
enough to be detected (the detector's threshold for the event's kind). Off
the template's channels and past its end it predicts nothing, and explains
nothing.
No window, distance or ratio of its own: the template says where and when a
spike's late phase lies. Such an event is a tail, as the events nearest a
tail centroid are, and is counted with them.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np

from .config import AssignConfig
from .errors import BundleError
from .types import EVENT_DTYPE

AMPLITUDE_RANGE = (0.6, 1.6)  # a spike is its unit's template scaled by a factor in this range
# a candidate's residual may also hold this fraction of the fitted template's energy (template mismatch and a
# colliding spike grow with the unit's size; the tail of another unit's spike claimed by a small template does not)
RESIDUAL_OF_FIT = 0.5
# ... and its footprint residual this fraction (a template's error grows with the unit's size)
FOOTPRINT_OF_FIT = 0.2


@numba.njit(cache=True, nogil=True)
def _nearest_one(feature, centroids, centroid_unit, radius, rate, within, candidates, top_d, top_j):
    """One spike's nearest centroid: (unit or -1, distance); its short list of units goes to ``candidates``.

    With ``rate`` > 0 a confident spike pulls its centroid towards itself.
    """
    f_dim = feature.shape[0]
    n_cand = candidates.shape[0]
    best = np.inf
    arg = 0
    n_top = 0
    for j in range(centroids.shape[0]):
        d = 0.0
        for f in range(f_dim):
            e = feature[f] - centroids[j, f]
            d += e * e
        if d < best:
            best = d
            arg = j
        if n_cand > 0 and (n_top < n_cand or d < top_d[n_top - 1]):  # insertion into the sorted short list
            m = min(n_top, n_cand - 1)
            while m > 0 and top_d[m - 1] > d:
                top_d[m] = top_d[m - 1]
                top_j[m] = top_j[m - 1]
                m -= 1
            top_d[m] = d
            top_j[m] = j
            n_top = min(n_top + 1, n_cand)
    for m in range(n_cand):
        candidates[m] = centroid_unit[top_j[m]] if m < n_top else -1
    dist = np.sqrt(best)
    unit = centroid_unit[arg] if dist <= radius[arg] else -1
    if rate > 0.0 and dist <= within * radius[arg]:
        for f in range(f_dim):
            centroids[arg, f] += rate * (feature[f] - centroids[arg, f])
    return unit, dist


@numba.njit(cache=True, nogil=True)
def _nearest(features, centroids, centroid_unit, radius, rate, within, unit, dist):
    """Label spike by spike by nearest centroid alone (see :func:`_nearest_one`)."""
    no_list = np.empty(0, np.int32)
    top_d = np.empty(1, np.float64)
    top_j = np.empty(1, np.int64)
    for i in range(features.shape[0]):
        unit[i], dist[i] = _nearest_one(features[i], centroids, centroid_unit, radius, rate, within, no_list,
                                        top_d, top_j)


def padded_rows(rows, dtype) -> np.ndarray:
    """Index lists of unequal length as one array (len(rows), longest), padded with -1 (at least one column)."""
    out = np.full((len(rows), max([r.size for r in rows] + [1])), -1, dtype)
    for i, r in enumerate(rows):
        out[i, :r.size] = r
    return out


def template_channels(templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's channels where its template (units, T, C) is not zero (templates are sparse): (units, K)
    padded with -1 (:func:`padded_rows`), and how many (units,)."""
    on = np.abs(templates).max(axis=1) > 0
    return padded_rows([np.flatnonzero(row) for row in on], np.int64), on.sum(axis=1).astype(np.int64)


@numba.njit(cache=True, nogil=True, inline="always")
def shifted_fit(x, templates, u, s, channel_index, c):
    """(<x, T>, |T|^2) of snippet ``x`` (T, K) on peak channel ``c`` and unit ``u``'s template shifted by ``s``."""
    t_len, n_k = x.shape
    dot = 0.0
    nrm = 0.0
    for t in range(max(0, s), min(t_len, t_len + s)):
        for j in range(n_k):
            w = templates[u, t - s, channel_index[c, j]]
            dot += x[t, j] * w
            nrm += w * w
    return dot, nrm


@numba.njit(cache=True, nogil=True)
def _match_one(x, c, channel_index, templates, candidates, amin, amax, prior, max_shift, min_snr, min_scale,
               max_residual, protos, max_footprint, footprint_of_fit, temperature):
    """The candidate unit whose scaled, shifted template explains most of snippet ``x`` (T, K): (unit or -1, gain,
    mean squared residual per sample of that unit's fit once it passes the gates, else NaN, confidence).

    gain = ||x||^2 - ||x - a T||^2 = 2 a <x, T> - a^2 ||T||^2 over the snippet's channels; the fit maximises
    gain - ``prior`` (a - 1)^2 ||T||^2, so a = (<x, T> + prior ||T||^2) / ((1 + prior) ||T||^2) clipped to
    [amin, amax]. The best fit must reach ``min_snr`` as a matched filter, <x, T> / ||T||, and a raw scale
    <x, T> / ||T||^2 of at least ``min_scale``, and leave at most ``max_residual`` of mean squared residual
    per sample (noise alone: 1) plus ``RESIDUAL_OF_FIT`` of the fitted template's energy.

    The confidence is the chosen unit's posterior probability: in noise units, with Gaussian noise and the scale
    prior, a unit's penalised gain p is twice its log-likelihood (and log prior) ratio against noise alone, so
    P(u | x) = exp(p_u / 2t) / (1 + sum_v exp(p_v / 2t)) over the candidates (best shift each) and noise (p = 0).
    ``temperature`` t > 1 widens it for noise correlated over samples and channels (``assign.confidence_temperature``).
    NaN when no unit is chosen.
    """
    t_len, n_k = x.shape
    inv_2t = 0.5 / temperature
    lse_m = 0.0  # running log-sum-exp of p / 2t over the hypotheses seen: noise alone (p = 0) to start
    lse_s = 1.0
    best_p = -np.inf  # the penalised gain that chooses
    best_g = -np.inf
    best_u = -1
    best_z = 0.0
    best_a = 0.0
    best_nrm = 0.0
    best_s = 0
    for m in range(candidates.shape[0]):
        u = candidates[m]
        seen = u < 0
        for mm in range(m):
            seen = seen or candidates[mm] == u
        if seen:
            continue
        unit_p = -np.inf
        for s in range(-max_shift, max_shift + 1):
            dot, nrm = shifted_fit(x, templates, u, s, channel_index, c)
            if nrm <= 0.0:
                continue
            a = min(max((dot + prior * nrm) / ((1.0 + prior) * nrm), amin), amax)
            p = 2.0 * a * dot - a * a * nrm - prior * (a - 1.0) * (a - 1.0) * nrm
            unit_p = max(unit_p, p)
            if p > best_p:
                best_p = p
                a = min(max(dot / nrm, amin), amax)  # the unit is chosen; its own best fit is judged
                best_g = 2.0 * a * dot - a * a * nrm
                best_u = u
                best_z = dot / np.sqrt(nrm)
                best_a = dot / nrm
                best_nrm = nrm
                best_s = s
        if unit_p > -np.inf:
            q = unit_p * inv_2t
            if q > lse_m:
                lse_s = lse_s * np.exp(lse_m - q) + 1.0
                lse_m = q
            else:
                lse_s += np.exp(q - lse_m)
    ok = best_u >= 0 and best_z >= min_snr and best_a >= min_scale
    res = np.nan
    if ok:
        energy = 0.0
        for t in range(t_len):
            for j in range(n_k):
                energy += x[t, j] * x[t, j]
        res = (energy - best_g) / (t_len * n_k)
        if max_residual < np.inf:
            ok = energy - best_g <= max_residual * t_len * n_k + RESIDUAL_OF_FIT * best_a * best_a * best_nrm
        if ok and max_footprint < np.inf:
            a = min(max(best_a, amin), amax)
            stat = 0.0
            for j in range(n_k):
                ch = channel_index[c, j]
                p = 0.0
                for t in range(max(0, best_s), min(t_len, t_len + best_s)):
                    p += (x[t, j] - a * templates[best_u, t - best_s, ch]) * protos[best_u, t - best_s]
                stat += p * p
            ok = stat <= max_footprint * n_k + footprint_of_fit * best_a * best_a * best_nrm
    conf = np.exp(best_p * inv_2t - lse_m) / lse_s if ok else np.nan
    return (best_u if ok else -1), best_g, res, conf


@numba.njit(cache=True, nogil=True)
def _match(xn, channels, channel_index, templates, candidates, amin, amax, prior, max_shift, min_snr, min_scale,
           max_residual, protos, max_footprint, footprint_of_fit, temperature, unit, gain, conf):
    """:func:`_match_one` for every spike not already rejected (``unit`` < 0 stays; its gain and confidence are
    NaN)."""
    for i in range(xn.shape[0]):
        gain[i] = np.nan
        conf[i] = np.nan
        if unit[i] >= 0:
            unit[i], gain[i], _, conf[i] = _match_one(xn[i], channels[i], channel_index, templates, candidates[i],
                                                      amin, amax, prior, max_shift, min_snr, min_scale, max_residual,
                                                      protos, max_footprint, footprint_of_fit, temperature)


@numba.njit(cache=True, nogil=True)
def _label(features, deep, xn, channels, centroids, centroid_unit, radius, rate, within, n_cand, near_units,
           channel_index, templates, amin, amax, prior, max_shift, min_snr, min_scale, max_residual, protos,
           max_footprint, footprint_of_fit, temperature, unit, dist, residual, conf):
    """Every event of a chunk in one pass: spikes (``deep``, rows of ``features`` in order) by nearest centroid and
    template fit among the short list; candidates by template fit among ``near_units`` of their channel, which
    must also leave at most ``max_residual`` (a spike's residual is not limited: collisions stay labelled).
    ``residual``: each labelled event's mean squared residual per sample (NaN if unlabelled); ``conf``: its
    confidence (:func:`_match_one`)."""
    n = max(n_cand, 1)
    top_d = np.empty(n, np.float64)
    top_j = np.empty(n, np.int64)
    cand = np.empty(n_cand, np.int32)
    r = 0
    for i in range(xn.shape[0]):
        c = channels[i]
        residual[i] = np.nan
        conf[i] = np.nan
        if deep[i]:
            unit[i], dist[i] = _nearest_one(features[r], centroids, centroid_unit, radius, rate, within, cand,
                                            top_d, top_j)
            r += 1
            if unit[i] >= 0:
                unit[i], _, res, cf = _match_one(xn[i], c, channel_index, templates, cand, amin, amax, prior,
                                                 max_shift, min_snr, min_scale, np.inf, protos, np.inf, 0.0,
                                                 temperature)
                if unit[i] >= 0:
                    residual[i] = res
                    conf[i] = cf
        else:
            dist[i] = np.nan
            unit[i], _, res, cf = _match_one(xn[i], c, channel_index, templates, near_units[c], amin, amax, prior,
                                             max_shift, min_snr, min_scale, max_residual, protos, max_footprint,
                                             footprint_of_fit, temperature)
            if unit[i] >= 0:
                residual[i] = res
                conf[i] = cf


class TemplateMatcher:
    """Choose among candidate units by how well each unit's template explains a snippet.

    Parameters
    ----------
    templates : ndarray (n_units, T, C)
        Mean waveforms in uV on the probe's channels (the bundle's ``templates``).
    voltage_noise : ndarray (C,)
        Noise per channel in uV: templates are compared with snippets in noise units.
    channel_index : ndarray (C, K)
        Snippet channels of each peak channel.
    max_shift : int
        Samples of misalignment tried each way.
    min_snr : float
        Matched-filter output ``<x, T> / |T|`` the best template must reach, else the spike is unassigned.
    min_scale : float
        Least ``<x, T> / |T|^2`` (the template's scale in the snippet) for the best template to count.
    amplitude_prior : float
        Cost of a scale a away from 1, as ``amplitude_prior`` x (a - 1)^2 |T|^2 of squared residual: the fit
        prefers a unit's template at about its own size (0: any scale in ``AMPLITUDE_RANGE`` is free).
    max_residual : float
        For candidates: the most mean squared residual per sample (noise units; noise alone gives 1) the best
        fit may leave, so the tail of another unit's spike that happens to correlate with a small template
        is not claimed (inf: no limit).
    max_footprint, footprint_of_fit : float
        With ``max_residual`` (for candidates): the most squared residual per snippet channel, projected on the
        chosen template's time course (``protos``, its peak channel's of unit norm; noise alone gives 1), plus
        ``footprint_of_fit`` x the fit's energy, so a neighbour's spike on channels in other proportions is
        not claimed (inf: no limit).
    confidence_temperature : float
        Widens the fit's posterior over units (the confidence) for noise correlated over samples and channels.
    """

    def __init__(self, templates, voltage_noise, channel_index, max_shift: int = 1, min_snr: float = 10.0,
                 min_scale: float = 0.6, max_residual: float = np.inf, amplitude_prior: float = 0.0,
                 max_footprint: float = np.inf, footprint_of_fit: float = FOOTPRINT_OF_FIT,
                 confidence_temperature: float = 1.0):
        tm = np.asarray(templates, dtype=np.float32)
        noise = np.asarray(voltage_noise, dtype=np.float32)
        if tm.ndim != 3 or tm.shape[2] != noise.shape[0]:
            raise BundleError(f"templates {tm.shape} do not fit {noise.shape[0]} channels")
        with np.errstate(divide="ignore"):
            inv = np.where(np.isfinite(noise) & (noise > 0), 1.0 / noise, 0.0).astype(np.float32)
        self.templates = np.ascontiguousarray(tm * inv[None, None, :])
        self.channel_index = np.ascontiguousarray(channel_index, dtype=np.int64)
        # the units a candidate peaking on channel c may be: those whose template peaks on one of c's snippet channels
        self.peak = (np.abs(self.templates).max(axis=1).argmax(axis=1) if tm.shape[0]  # each unit's peak channel
                     else np.zeros(0)).astype(np.int64)
        self.near_units = padded_rows([np.flatnonzero(np.isin(self.peak, row)) for row in self.channel_index],
                                      np.int32)
        self.max_shift = int(max_shift)
        self.min_snr = float(min_snr)
        self.min_scale = float(min_scale)
        self.max_residual = float(max_residual)
        self.amplitude_prior = float(amplitude_prior)
        # each unit's template on its peak channel, of unit norm: the shape a footprint's channels share
        pk = self.templates[np.arange(tm.shape[0]), :, self.peak] if tm.shape[0] else np.zeros((0, tm.shape[1]))
        nrm = np.linalg.norm(pk, axis=1, keepdims=True)
        self.protos = np.ascontiguousarray(np.where(nrm > 0, pk / np.maximum(nrm, 1e-12), 0.0), dtype=np.float32)
        self.max_footprint = float(max_footprint)
        self.footprint_of_fit = float(footprint_of_fit)
        self.temperature = float(confidence_temperature)

    @property
    def n_samples(self) -> int:
        return self.templates.shape[1]

    def match(self, xn: np.ndarray, channels: np.ndarray, candidates: np.ndarray, unit: np.ndarray,
              gates: bool = True, confidence: np.ndarray | None = None) -> np.ndarray:
        """Overwrite ``unit`` (k,) int32 in place with the best-fitting candidate (or -1; a unit < 0 on entry
        stays); return the gains (k,). Without ``gates`` only the residual limit judges the fit (the matched
        filter and scale gates are the caller's). ``confidence`` (k,) float32, if given, receives each label's
        posterior probability (NaN: none)."""
        gain = np.empty(unit.shape[0], np.float64)
        if confidence is None:
            confidence = np.empty(unit.shape[0], np.float32)
        if unit.shape[0]:
            _match(np.ascontiguousarray(xn, dtype=np.float32), np.ascontiguousarray(channels, dtype=np.int64),
                   self.channel_index, self.templates, np.ascontiguousarray(candidates, dtype=np.int32),
                   AMPLITUDE_RANGE[0], AMPLITUDE_RANGE[1], self.amplitude_prior, self.max_shift,
                   self.min_snr if gates else -np.inf, self.min_scale if gates else -np.inf, self.max_residual,
                   self.protos, self.max_footprint if self.max_residual < np.inf else np.inf, self.footprint_of_fit,
                   self.temperature, unit, gain, confidence)
        return gain


class Assigner:
    """Label feature vectors by their nearest centroid, and by template fit among the nearest units.

    Parameters
    ----------
    centroids : ndarray (n, F) float32
    centroid_unit : ndarray (n,) int
        The unit each centroid belongs to (-1: a centroid of noise, whose spikes are unassigned;
        ``rtsort.types.TAIL``: a centroid of a unit's tails, whose events are not spikes).
    radius : ndarray (n,) float32
        Rejection distance of each centroid (inf = never reject).
    track_rate, track_within : float
        Centroid tracking (``[assign]``).
    matcher : TemplateMatcher, optional
        With it, :meth:`assign` given the snippets picks among the units of the
        ``candidates`` nearest centroids by template fit.
    candidates : int
    """

    def __init__(self, centroids, centroid_unit, radius, track_rate: float = 0.0, track_within: float = 0.5,
                 matcher: TemplateMatcher | None = None, candidates: int = 0):
        self.centroids = np.array(centroids, dtype=np.float32, order="C")  # a copy: tracking moves it
        self.centroid_unit = np.asarray(centroid_unit, dtype=np.int32)
        self.radius = np.asarray(radius, dtype=np.float32)
        self.track_rate = np.float32(track_rate)
        self.track_within = np.float32(track_within)
        self.matcher = matcher if candidates > 0 else None
        self.candidates = int(candidates) if matcher is not None else 0
        n = self.centroids.shape[0]
        if self.centroids.ndim != 2 or self.centroid_unit.shape != (n,) or self.radius.shape != (n,):
            raise BundleError(
                f"centroids {self.centroids.shape}, centroid units {self.centroid_unit.shape} and radii "
                f"{self.radius.shape} do not agree"
            )

    @property
    def n_features(self) -> int:
        return self.centroids.shape[1]

    def copy(self) -> "Assigner":
        """A scratch copy (its own centroids), for warming up without moving tracked centroids."""
        return Assigner(self.centroids, self.centroid_unit, self.radius, self.track_rate, self.track_within,
                        self.matcher, self.candidates)

    def label(self, features: np.ndarray, xn: np.ndarray, channels: np.ndarray, deep: np.ndarray,
              residual: np.ndarray | None = None,
              confidence: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Label events: spikes (``deep``) as :meth:`assign` does, candidates by template fit alone.

        ``features`` holds the rows of the deep events only (candidates are not
        encoded); ``xn`` and ``channels`` cover every event. A candidate's units
        are those whose template peaks on one of its snippet channels; without
        a matcher no candidate is claimed. Distances of candidates are NaN.
        ``residual`` (k,) float64, if given, receives each event's mean squared
        residual per sample under its unit's fit (NaN: no template fit); ``confidence`` (k,) float32, its
        posterior probability (NaN: no template fit chose it).
        """
        k = xn.shape[0]
        if residual is not None:
            residual[:] = np.nan
        if confidence is not None:
            confidence[:] = np.nan
        if self.matcher is None or k == 0 or self.centroids.shape[0] == 0:
            unit = np.full(k, -1, np.int32)
            dist = np.full(k, np.nan, np.float32)
            d = np.flatnonzero(deep)
            if d.size:
                unit[d], dist[d] = self.assign(features)
            return unit, dist
        unit = np.empty(k, np.int32)
        dist = np.empty(k, np.float32)
        m = self.matcher
        _label(np.ascontiguousarray(features, dtype=np.float32), np.ascontiguousarray(deep, dtype=np.bool_),
               np.ascontiguousarray(xn, dtype=np.float32), np.ascontiguousarray(channels, dtype=np.int64),
               self.centroids, self.centroid_unit, self.radius, self.track_rate, self.track_within, self.candidates,
               m.near_units, m.channel_index, m.templates, AMPLITUDE_RANGE[0], AMPLITUDE_RANGE[1],
               m.amplitude_prior, m.max_shift, m.min_snr, m.min_scale, m.max_residual, m.protos,
               m.max_footprint if m.max_residual < np.inf else np.inf, m.footprint_of_fit, m.temperature, unit, dist,
               residual if residual is not None else np.empty(k, np.float64),
               confidence if confidence is not None else np.empty(k, np.float32))
        return unit, dist

    def assign(self, features: np.ndarray, xn: np.ndarray | None = None,
               channels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (unit (k,) int32 with -1 = unassigned, distance to the nearest centroid (k,) float32).

        ``xn`` (k, T, K) noise-unit snippets and their peak ``channels`` (k,) turn
        on the template fit, when this assigner has a matcher.
        """
        k = features.shape[0]
        if k == 0 or self.centroids.shape[0] == 0:
            return np.full(k, -1, np.int32), np.full(k, np.inf, np.float32)
        if self.matcher is not None and xn is not None:
            return self.label(features, xn, channels, np.ones(k, bool))
        unit = np.empty(k, np.int32)
        dist = np.empty(k, np.float32)
        _nearest(np.ascontiguousarray(features, dtype=np.float32), self.centroids, self.centroid_unit, self.radius,
                 self.track_rate, self.track_within, unit, dist)
        return unit, dist


def unit_purity(units: list) -> np.ndarray:
    """Each unit's share of spikes from its own neuron, from its refractory-period violations (the unit table's
    ``isi_violations_ratio`` r, Hill et al. 2011): spikes of other neurons, a fraction f of the unit's, firing
    independently of it, give r = f (1 - f), so f = (1 - sqrt(1 - 4 r)) / 2; r >= 1/4 says at least half, 0.5.
    Two neurons merged into one unit are seen this way (their spikes violate each other's refractory period); a
    unit without the metric counts as pure. A spike's confidence is its template posterior times this."""
    r = np.array([float(u.get("isi_violations_ratio", 0.0) or 0.0) if isinstance(u, dict) else 0.0 for u in units])
    r = np.where(np.isfinite(r), np.maximum(r, 0.0), 0.0)
    f = np.where(r < 0.25, (1.0 - np.sqrt(np.clip(1.0 - 4.0 * r, 0.0, 1.0))) / 2.0, 0.5)
    return (1.0 - f).astype(np.float32)


def make_assigner(centroids, centroid_unit, radius, templates, voltage_noise, channel_index, cfg: AssignConfig,
                  track_rate: float | None = None) -> Assigner:
    """The labelling ``[assign]`` asks for: centroids, and the template fit unless ``template_candidates`` = 0."""
    if track_rate is not None:
        cfg = replace(cfg, track_rate=float(track_rate))  # validated as the config's own
    matcher = TemplateMatcher(templates, voltage_noise, channel_index, cfg.template_max_shift,
                              cfg.template_min_snr, cfg.template_min_scale,
                              cfg.candidate_max_residual if cfg.candidate_max_residual > 0 else np.inf,
                              cfg.amplitude_prior,
                              cfg.candidate_max_footprint if cfg.candidate_max_footprint > 0 else np.inf,
                              confidence_temperature=cfg.confidence_temperature) \
        if cfg.template_candidates > 0 else None
    return Assigner(centroids, centroid_unit, radius, cfg.track_rate, cfg.track_within, matcher,
                    cfg.template_candidates)


@numba.njit(cache=True, nogil=True)
def _late_phase(samples, channels, amplitudes, units, keep, deep, order, templates, nbefore, spike_depth,
                event_depth, lo, back, h_samples, h_units, state, out):
    """One chunk of :class:`LatePhase`, events in trough order (``order``): out[i] when an earlier labelled spike's
    template explains event i; the labelled spikes that are not explained join the history (``h_*``, ``state`` =
    [count, newest trough]); spikes older than ``back`` before the newest leave. False (nothing changed) when the
    history has no room: the caller grows it and calls again."""
    n_h = state[0]
    newest = state[1]
    if n_h + samples.shape[0] > h_samples.shape[0]:
        return False
    t_len = templates.shape[1]
    for o in range(order.shape[0]):
        i = order[o]
        out[i] = False
        s = samples[i]
        if keep[i]:
            c = channels[i]
            a = amplitudes[i]
            depth = spike_depth[c] if deep[i] else event_depth[c]
            for j in range(n_h):
                lag = s - h_samples[j]
                if lag < lo or nbefore + lag + 1 >= t_len:
                    continue
                best = -1e30  # the residual trough left by the best-aligned prediction (lag - 1 .. lag + 1)
                for d in range(-1, 2):
                    v = templates[h_units[j], nbefore + lag + d, c]
                    if a - v > best:
                        best = a - v
                if best > -depth:  # what the earlier spike does not predict is too shallow to be detected
                    out[i] = True
                    break
        if not out[i] and keep[i] and units[i] >= 0:
            h_samples[n_h] = s
            h_units[n_h] = units[i]
            n_h += 1
            if s > newest:
                newest = s
    m = 0
    for j in range(n_h):
        if h_samples[j] >= newest - back:
            h_samples[m] = h_samples[j]
            h_units[m] = h_units[j]
            m += 1
    state[0] = m
    state[1] = newest
    return True


class LatePhase:
    """The events an earlier labelled spike's template explains (see the module docstring), chunk by chunk in
    stream order.

    Parameters
    ----------
    templates : ndarray (n_units, T, C)
        The bundle's templates (uV), reaching the late phase.
    n_before : int
        Samples before the trough in a template.
    spike_depth, event_depth : ndarray (C,)
        The detector's depths (uV) for a spike and for any event (its lowest threshold) on each channel.
    due_spread : int
        The most samples by which an event can leave the snippet extractor later than an event whose trough is
        later (``SnippetExtractor.due_spread``). Only spikes more than this before an event may explain it, so
        they have always left with its own chunk or before, whatever the chunking.
    enabled : bool
    """

    def __init__(self, templates, n_before: int, spike_depth, event_depth, due_spread: int = 0,
                 enabled: bool = True):
        self.templates = np.ascontiguousarray(templates, dtype=np.float32)
        self.n_before = int(n_before)
        self.spike_depth = np.ascontiguousarray(spike_depth, dtype=np.float32)
        self.event_depth = np.ascontiguousarray(event_depth, dtype=np.float32)
        self.lo = int(due_spread) + 1
        self._back = max(self.templates.shape[1] - self.n_before, self.lo) + int(due_spread)
        self.enabled = bool(enabled) and self.templates.shape[0] > 0
        self.reset()

    def reset(self) -> None:
        self._samples = np.zeros(256, np.int64)  # the labelled spikes whose template may still reach a later event
        self._units = np.zeros(256, np.int64)
        self._state = np.array([0, np.iinfo(np.int64).min], np.int64)  # how many, the newest trough

    def warmup(self) -> None:
        """Compile the kernel (on a scratch copy: the history stays as it is)."""
        if not self.enabled:
            return
        ev = np.zeros(2, EVENT_DTYPE)
        ev["sample_index"] = (0, self.lo)
        for n in (2, 1):  # a chunk's fields are strided, unless it holds one event
            scratch = LatePhase(self.templates, self.n_before, self.spike_depth, self.event_depth, self.lo - 1)
            one = np.ones(n, np.bool_)
            scratch(ev[:n], np.zeros(n, np.int32), one, one)

    def __call__(self, events: np.ndarray, units: np.ndarray, keep: np.ndarray, deep: np.ndarray) -> np.ndarray:
        """(k,) bool: which of a chunk's ``events`` (those in ``keep``, labelled ``units``) an earlier labelled
        spike's template explains; the ``deep`` ones (spikes) are held to the spikes' threshold, the others
        (candidates) to the detector's lowest.

        Chunks come in stream order; one call with every event of a recording gives the same answer."""
        out = np.zeros(events.size, np.bool_)
        if events.size == 0 or not self.enabled:
            return out
        order = np.argsort(events["sample_index"], kind="stable")
        while not _late_phase(events["sample_index"], events["channel"], events["amplitude"],
                              np.ascontiguousarray(units, dtype=np.int64), np.ascontiguousarray(keep, np.bool_),
                              np.ascontiguousarray(deep, np.bool_), order, self.templates, self.n_before, self.spike_depth, self.event_depth, self.lo,
                              self._back, self._samples, self._units, self._state, out):
            grow = 2 * (self._samples.size + events.size)
            self._samples, self._units = (np.resize(a, grow) for a in (self._samples, self._units))
        return out
