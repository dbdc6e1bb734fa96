"""Clustering spike features into units (scikit-learn), merging, centroids and rejection radii.

1. HDBSCAN on the features (latent + position) of up to ``max_spikes`` spikes
   finds dense groups and leaves the rest as noise: no number of units to give.
   Each group is then split where its spikes, read on the group's own
   channels, form several dense groups (:func:`split_groups`): neighbouring
   units of one shape share a group in the global feature space.
2. Groups whose mean waveforms are alike (relative distance below
   ``merge_threshold`` after the best shift of +/-1 sample, on the channels both
   cover) are merged, nearest first, when their spikes are one population
   (:func:`unimodal_merges`): projected on the line between the two mean
   waveforms they form one mode (Hartigan's dip test). A unit whose spikes peak
   on two channels, or that HDBSCAN cut in two, is merged here; two neurons of
   one shape and different size (a tetrode's neighbours) stay apart.
3. Units that are one neuron split by drift (near, alike, and taking turns
   over time) are joined (:func:`drift_merges`); units that are a bigger
   unit's tails (their spikes locked to its spikes at a lag of 0.2-2 ms) are
   dropped (:func:`tail_units`).
4. Every group keeps its own centroid, labelled with its unit, and a rejection
   radius: ``reject_factor`` x the ``reject_quantile`` of its members' distances.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace

import numpy as np
from sklearn.cluster import HDBSCAN, AgglomerativeClustering

from ..assign import Assigner, make_assigner
from ..config import AssignConfig, ClusterConfig

log = logging.getLogger("rtsort.train")

FAR = 1e3  # template distance of groups that cannot be compared
# counts correlate by chance with a spread of about 1/sqrt(bins): 20 bins put -0.7 at 3 sigma for unrelated units
MIN_DRIFT_BINS = 20
# a piece of a neuron that drift moved away from its channels fires only while the probe sits at one depth: its
# spikes' mean motion rank (0..1 over the recording's time bins) differs from its partner's by LOCKED_RANK, at
# LOCKED_Z standard errors (counted in time bins), once the probe moved MIN_MOTION_UM (measured on
# tools/compare.py's recordings: pieces 0.35-0.37 at 3.4-3.7; every other pair <= 0.09 at <= 1.2)
MIN_MOTION_UM = 5.0
LOCKED_RANK = 0.25
LOCKED_Z = 3.0
TAIL_MIN_LAG_MS = 0.2  # closer than this, two units' events are one spike seen twice, not a tail
TAIL_UM = 100.0  # a tail unit sits this close to its parent
# two groups are two populations when the dip test rejects one mode at this level (the usual 1 %); the test
# sees at most DIP_MAX_SPIKES spikes of each group
DIP_P = 0.01
DIP_MAX_SPIKES = 2000


@dataclass
class Clustering:
    centroids: np.ndarray  # (n_centroids, F) float32
    centroid_unit: np.ndarray  # (n_centroids,) int32
    radius: np.ndarray  # (n_centroids,) float32
    labels: np.ndarray  # (n_spikes,) int32, the runtime's labels for every spike
    n_groups: int


def templates_on_probe(xn: np.ndarray, channels: np.ndarray, channel_index: np.ndarray, labels: np.ndarray,
                       n_labels: int, n_channels: int):
    """Mean snippet of each label on the probe's channels: (n, C, T) and the spike count per channel (n, C)."""
    t, k = xn.shape[1], xn.shape[2]
    m = labels >= 0
    sums = np.zeros((n_labels, n_channels, t), dtype=np.float64)
    counts = np.zeros((n_labels, n_channels), dtype=np.int64)
    lab = np.repeat(labels[m], k)
    chan = channel_index[channels[m]].ravel()
    np.add.at(sums, (lab, chan), xn[m].transpose(0, 2, 1).reshape(-1, t))
    np.add.at(counts, (lab, chan), 1)
    return (sums / np.maximum(counts, 1)[:, :, None]).astype(np.float32), counts


def template_distances(templates: np.ndarray, counts: np.ndarray, max_shift: int = 1) -> np.ndarray:
    """Relative distance between every pair of mean waveforms (FAR where they cannot be compared)."""
    n = templates.shape[0]
    size = counts.max(axis=1)
    covered = counts >= 0.5 * size[:, None]
    peak = np.abs(templates).max(axis=2).argmax(axis=1)
    d = np.full((n, n), FAR, dtype=np.float64)
    np.fill_diagonal(d, 0.0)
    # comparable: both cover the peak channel of one of them
    own = covered[:, peak].T & covered[np.arange(n), peak][:, None]  # own[a, b]: b covers a's peak
    for a, b in zip(*np.nonzero(np.triu(own | own.T, k=1))):
        both = covered[a] & covered[b]
        ta, tb = templates[a, both], templates[b, both]
        scale = max(np.linalg.norm(ta), np.linalg.norm(tb), 1e-6)
        best = min(np.linalg.norm(ta - np.roll(tb, s, axis=1)) for s in range(-max_shift, max_shift + 1))
        d[a, b] = d[b, a] = best / scale
    return d


def _on_channels(m: np.ndarray, chans: np.ndarray, xn: np.ndarray, channels: np.ndarray, slot: np.ndarray,
                 fill: np.ndarray) -> np.ndarray:
    """Spikes ``m``'s snippets on the probe's channels ``chans``: (n, T, len(chans)); a channel outside a spike's
    snippet takes ``fill`` (T, len(chans))."""
    where = slot[channels[m]][:, chans]
    w = np.take_along_axis(xn[m], np.maximum(where, 0)[:, None, :], axis=2)
    return np.where(where[:, None, :] >= 0, w, fill[None])


def _aligned(w: np.ndarray, template: np.ndarray, max_shift: int) -> np.ndarray:
    """Each snippet of ``w`` (n, T, C) shifted by the whole samples (up to ``max_shift``) that best match it to
    ``template`` (T, C): a detector aligns a spike to the trough of the channel it was found on, and one neuron's
    spikes found on two channels come in two alignments."""
    shifts = np.arange(-max_shift, max_shift + 1)
    score = np.stack([np.einsum("ntc,tc->n", w, np.roll(template, s, axis=0)) for s in shifts], axis=1)
    best = shifts[score.argmax(axis=1)]  # the snippet matches the template moved by this much: move it back
    idx = (np.arange(w.shape[1])[None, :] + best[:, None]) % w.shape[1]
    return np.take_along_axis(w, idx[:, :, None], axis=1)


def _one_mode_p(wa: np.ndarray, wb: np.ndarray) -> float:
    """The dip test's p-value that two sides' snippets (as many of each; (n, T, C), aligned, on the same channels)
    are one population, projected on the line between the sides' means less its part along the two means'
    slopes (a sub-sample offset between how the two sides were aligned shows there and is not a second
    neuron)."""
    import diptest

    ma, mb = wa.mean(axis=0), wb.mean(axis=0)
    slopes = np.linalg.qr(np.stack([np.gradient(ma, axis=0).ravel(), np.gradient(mb, axis=0).ravel()], 1))[0]
    axis = (ma - mb).ravel()
    axis -= slopes @ (slopes.T @ axis)
    axis /= max(np.linalg.norm(axis), 1e-9)
    proj = np.concatenate([wa.reshape(wa.shape[0], -1) @ axis, wb.reshape(wb.shape[0], -1) @ axis])
    return float(diptest.diptest(proj.astype(np.float64))[1])


def unimodal_merges(groups: np.ndarray, dist: np.ndarray, tm: np.ndarray, counts: np.ndarray, xn: np.ndarray,
                    channels: np.ndarray, channel_index: np.ndarray, cfg: ClusterConfig, seed: int = 0,
                    times_s: np.ndarray | None = None, motion_um: np.ndarray | None = None,
                    max_shift: int = 1) -> np.ndarray:
    """Merge alike groups whose spikes are one population; return the unit of each group.

    Pairs of groups whose template distance is below ``merge_threshold``, and
    that average-linkage clustering of those distances at ``merge_threshold``
    puts together, are taken nearest first. Each side is the merged unit its group belongs to by
    then. Their spikes, on the channels both cover (the second aligned by the
    templates' best shift), are projected on the line between the two sides'
    mean waveforms, less its part along the two means' slopes (a sub-sample
    offset between how the two sides were aligned shows there and is not a
    second neuron). One neuron cut in two gives one mode there, and the sides
    are merged. Two neurons give two modes: Hartigan's dip test rejects one mode
    at ``DIP_P``, and they stay apart. The test reads the data, so it needs no
    threshold on how far apart two neurons' waveforms must be. Two sides that
    take turns over time (``times_s``: their spike counts per ``drift_bin_s``
    correlate at or below ``-drift_merge_anticorrelation``) are one neuron at
    two depths of the probe's drift, two modes in waveform and one unit: they
    are merged without the test. So are two sides locked to different depths of
    the drift that motion correction removed (``motion_um``, the displacement
    applied to each spike; an imperfect correction leaves a neuron's waveform
    a little different at each depth): their spikes' mean motion ranks differ
    by ``LOCKED_RANK`` at ``LOCKED_Z`` standard errors (:func:`locked_pieces`'
    test), once the probe moved ``MIN_MOTION_UM``.
    """
    n_groups = tm.shape[0]
    unit_of = np.arange(n_groups)  # each group's merged unit: its lowest group
    if n_groups < 2:
        return unit_of
    groups_of = {g: [g] for g in range(n_groups)}

    def merge(ra, rb):
        lo, hi = min(ra, rb), max(ra, rb)
        groups_of[lo] = sorted(groups_of[lo] + groups_of.pop(hi))
        unit_of[groups_of[lo]] = lo

    rng = np.random.default_rng(seed)
    k_chan = channel_index.shape[1]
    slot = np.full((channel_index.shape[0], tm.shape[1]), -1, np.int64)
    slot[np.arange(channel_index.shape[0])[:, None], channel_index] = np.arange(k_chan)[None, :]
    members = [np.flatnonzero(groups == g) for g in range(n_groups)]
    turns = None
    if times_s is not None and times_s.size:
        edges = np.arange(times_s.min(), times_s.max() + cfg.drift_bin_s, cfg.drift_bin_s)
        if edges.size - 1 >= MIN_DRIFT_BINS and cfg.drift_merge_um > 0:
            turns = np.stack([np.histogram(times_s[members[g]], edges)[0] for g in range(n_groups)]).astype(float)
    locked = None
    if turns is not None and motion_um is not None and np.ptp(motion_um) >= MIN_MOTION_UM:
        from scipy.stats import rankdata

        locked = (rankdata(motion_um) - 0.5) / motion_um.size  # each spike's motion rank, 0..1
        time_bin = np.minimum(((times_s - edges[0]) / cfg.drift_bin_s).astype(np.int64), edges.size - 2)
    # candidates: pairs within one cluster of the average-linkage clustering of the template distances at
    # merge_threshold (a chain of alike pairs does not make one candidate unit of unlike ends)
    linked = AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage="average",
                                     distance_threshold=cfg.merge_threshold).fit_predict(dist)
    pairs = np.argwhere(np.triu((dist < cfg.merge_threshold) & (linked[:, None] == linked[None, :]), k=1))
    for a, b in sorted(pairs.tolist(), key=lambda p: dist[p[0], p[1]]):
        ra, rb = int(unit_of[a]), int(unit_of[b])
        if ra == rb:
            continue
        sides = [np.array(groups_of[r]) for r in (ra, rb)]
        spikes = [np.concatenate([members[g] for g in side]) for side in sides]
        if turns is not None:
            c = [turns[side].sum(axis=0) for side in sides]
            c = [(x - x.mean()) / max(np.linalg.norm(x - x.mean()), 1e-9) for x in c]
            r = float(c[0] @ c[1])
            if r <= -cfg.drift_merge_anticorrelation:
                merge(ra, rb)
                log.debug("groups %d and %d take turns over time (count correlation %.2f): one drifting neuron, "
                          "merged", a, b, r)
                continue
        if locked is not None:
            d = abs(locked[spikes[0]].mean() - locked[spikes[1]].mean())
            se = np.sqrt(sum(1.0 / max(np.unique(time_bin[o]).size, 1) for o in spikes) / 12.0)
            if d >= LOCKED_RANK and d >= LOCKED_Z * se:
                merge(ra, rb)
                log.debug("groups %d and %d fire at different depths of the drift (motion ranks %.2f apart): one "
                          "drifting neuron, merged", a, b, d)
                continue
        # as many spikes of each side: a small neuron beside a big one is a mode of half the mass, not a shoulder
        n_each = min(spikes[0].size, spikes[1].size, DIP_MAX_SPIKES)
        spikes = [sp if sp.size == n_each else np.sort(rng.choice(sp, n_each, replace=False)) for sp in spikes]
        cover = [counts[side].sum(axis=0) for side in sides]
        both = np.flatnonzero((cover[0] >= 0.5 * cover[0].max()) & (cover[1] >= 0.5 * cover[1].max()))
        if both.size == 0:
            continue
        means = [np.average(tm[side], axis=0, weights=np.maximum(counts[side][:, both].sum(axis=1), 1))[both].T
                 for side in sides]  # (T, n_both)
        shift = min(range(-max_shift, max_shift + 1), key=lambda s: np.linalg.norm(means[0] - np.roll(means[1], s,
                                                                                                           axis=0)))
        # a channel outside a spike's snippet takes the two sides' common mean: it carries no side's own shape
        common = 0.5 * (means[0] + np.roll(means[1], shift, axis=0))
        wa = _on_channels(spikes[0], both, xn, channels, slot, common)
        wb = np.roll(_on_channels(spikes[1], both, xn, channels, slot, np.roll(common, -shift, axis=0)), shift,
                     axis=1)
        # each spike aligned on its own; the samples a shift wrapped round the snippet's ends are left out
        edge = slice(2 * max_shift, common.shape[0] - 2 * max_shift)
        p = _one_mode_p(*(_aligned(w, common, max_shift)[:, edge] for w in (wa, wb)))
        if p >= DIP_P:
            merge(ra, rb)
        log.debug("groups %d and %d (template distance %.2f; %d and %d spikes, peaks %.1f and %.1f x noise; "
                  "shift %d): dip p %.3g: %s", a, b, dist[a, b], members[a].size, members[b].size,
                  np.abs(tm[a]).max(), np.abs(tm[b]).max(), shift, p,
                  "one population, merged" if p >= DIP_P else "two populations, kept apart")
    return np.unique(unit_of, return_inverse=True)[1]


def small_units(labels: np.ndarray, n_units: int, cfg: ClusterConfig) -> np.ndarray:
    """Which units keep too few spikes to be units: in the clustering's subsample (``max_spikes`` of all the
    labelled spikes ``labels``) they would hold fewer than a cluster's least size (``min_cluster_size``). HDBSCAN
    found a dense group there, and the labels of every spike then gave most of it to the units around it. The
    rule sets no threshold of its own."""
    share = min(1.0, cfg.max_spikes / max(labels.size, 1))
    return np.bincount(labels[labels >= 0], minlength=n_units)[:n_units] * share < cfg.min_cluster_size


def split_groups(groups: np.ndarray, xn: np.ndarray, channels: np.ndarray, channel_index: np.ndarray,
                 n_channels: int, cfg: ClusterConfig, seed: int = 0):
    """Split each HDBSCAN group whose spikes form several dense groups of their own on the group's channels.

    Neighbouring units of one waveform shape can share a group in the global
    feature space. Within a group, every spike is read on the same channels
    (the group's template's K largest, where its snippet has them; the
    template fills the rest), so position shows as amplitude per channel;
    HDBSCAN on 5 principal components of those waveforms finds the parts.
    Spikes it leaves as noise join the nearest part, and each part is split
    again in its own principal components until none splits. Parts of one unit (a
    drifting one, seen at two depths) are joined again by the template merge
    and the drift merge that follow. Returns the new groups.
    """
    from sklearn.decomposition import PCA

    k_chan = channel_index.shape[1]
    slot = np.full((channel_index.shape[0], n_channels), -1, np.int64)  # slot[c, q]: q's place in c's snippet
    slot[np.arange(channel_index.shape[0])[:, None], channel_index] = np.arange(k_chan)[None, :]
    out = groups.copy()
    todo = list(range(int(groups.max()) + 1))
    while todo:  # the parts of a split are split again, until none splits
        g = todo.pop(0)
        m = np.flatnonzero(out == g)
        if m.size < 2 * cfg.min_cluster_size:
            continue
        tm = templates_on_probe(xn[m], channels[m], channel_index, np.zeros(m.size, np.int64), 1, n_channels)[0][0]
        ptp = tm.max(axis=1) - tm.min(axis=1)
        chans = np.argsort(ptp)[::-1][:k_chan]
        w = _on_channels(m, chans, xn, channels, slot, tm[chans].T)
        pcs = PCA(min(5, m.size - 1), random_state=seed).fit_transform(w.reshape(m.size, -1))
        part = HDBSCAN(min_cluster_size=cfg.min_cluster_size, min_samples=cfg.min_samples,
                       copy=True).fit_predict(pcs)
        n_parts = int(part.max()) + 1
        if n_parts < 2:
            continue
        centres = np.stack([pcs[part == j].mean(axis=0) for j in range(n_parts)])
        part = np.where(part >= 0, part, ((pcs[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1))
        nxt = int(out.max()) + 1  # the first part keeps the group's number, the others take new ones
        out[m] = np.r_[g, nxt:nxt + n_parts - 1][part]
        todo.extend([g, *range(nxt, nxt + n_parts - 1)])
        log.debug("group %d (%d spikes) split into %d on its own channels: %s", g, m.size, n_parts,
                  np.bincount(part).tolist())
    return out


def unit_medians(units: np.ndarray, values: np.ndarray, n_units: int) -> np.ndarray:
    """Each unit's median of ``values`` (k, D) over its spikes: (n_units, D), NaN for a unit without spikes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the median of nothing: NaN
        return np.stack([np.median(values[units == u], axis=0) for u in range(n_units)])


def motion_trace(units: np.ndarray, depths: np.ndarray, time_bin: np.ndarray, n_bins: int, n_units: int) -> np.ndarray:
    """The probe's motion per time bin (um along its depth): over the units with a few spikes per bin, the median
    of (their spikes' median depth in the bin - their median depth). A bin no unit fills takes the median."""
    rows = []
    for u in range(n_units):
        m = units == u
        if np.count_nonzero(m) < 2 * n_bins:
            continue
        own = depths[m]
        b = time_bin[m]
        row = np.full(n_bins, np.nan)
        for k in np.unique(b):
            in_bin = own[b == k]
            if in_bin.size >= 3:
                row[k] = np.median(in_bin)
        rows.append(row - np.median(own))
    if not rows:
        return np.zeros(n_bins)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a bin no unit fills: NaN, filled below
        motion = np.nanmedian(np.array(rows), axis=0)
    fill = np.nanmedian(motion) if np.isfinite(motion).any() else 0.0
    return np.where(np.isnan(motion), fill, motion)


def locked_pieces(units: np.ndarray, time_bin: np.ndarray, motion: np.ndarray, candidates: np.ndarray) -> list:
    """Units that fire only while the probe sits at one depth, each with the unit it is a piece of.

    Each unit's motion rank is the mean, over its spikes, of the rank (0..1) of the motion in its spike's
    time bin: about 0.5 for a neuron that fires whatever the probe's depth. A unit joins the partner among
    ``candidates[unit]`` (near and alike) that fires in more time bins and whose rank differs most, by at least
    ``LOCKED_RANK`` and ``LOCKED_Z`` standard errors (counted in time bins). Returns [(piece, partner, rank
    difference)], the most locked first; a piece is nobody's partner."""
    from scipy.stats import rankdata

    n = candidates.shape[0]
    rank = (rankdata(motion) - 0.5) / motion.size
    mean = np.full(n, np.nan)
    bins = np.zeros(n)
    for u in range(n):
        b = time_bin[units == u]
        if b.size:
            mean[u] = rank[b].mean()
            bins[u] = np.unique(b).size
    out, pieces = [], set()
    for b in np.argsort(-np.abs(np.nan_to_num(mean - 0.5)), kind="stable"):
        if not np.isfinite(mean[b]):
            continue
        best, best_d = -1, 0.0
        for a in np.flatnonzero(candidates[b]):
            d = abs(mean[a] - mean[b])
            se = np.sqrt((1.0 / max(bins[a], 1.0) + 1.0 / max(bins[b], 1.0)) / 12.0)  # a rank's spread: 1 / sqrt(12)
            if a not in pieces and bins[a] > bins[b] and d >= LOCKED_RANK and d >= LOCKED_Z * se and d > best_d:
                best, best_d = int(a), float(d)
        if best >= 0:
            out.append((int(b), best, best_d))
            pieces.add(int(b))
    return out


def drift_merges(units: np.ndarray, locations: np.ndarray, peak_waveforms: np.ndarray, times_s: np.ndarray,
                 cfg: ClusterConfig, n_units: int = 0, pieces: bool = False) -> np.ndarray:
    """Join units that are one neuron split by drift; return the new unit of each old unit.

    A neuron that moves along the probe changes its waveform on each channel,
    so clustering sees it as two units, each firing while the neuron sits at
    its depth. Two units are joined when they sit within ``drift_merge_um``,
    their peak-channel waveforms agree (cosine >= ``drift_merge_similarity``)
    and they take turns: their spike counts in ``drift_bin_s`` bins correlate
    at or below ``-drift_merge_anticorrelation``. Neurons that merely look alike
    fire independently (correlation near 0) and stay apart. A small piece that
    fires only at one extreme of the drift hardly changes its partner's counts:
    it joins the near, alike unit it is locked against when the probe's motion
    (:func:`motion_trace`, at least ``MIN_MOTION_UM``) explains when it fires
    (:func:`locked_pieces`; with ``pieces``: for the final units, whose labels
    are the runtime's. On the clustering's many small groups, C's drifting
    recording lost two units to it).

    Parameters
    ----------
    units : (k,) int, unit of each spike (-1 = none)
    locations : (k, 2) um
    peak_waveforms : (k, T) the snippet's peak channel in noise units
    times_s : (k,) spike times in seconds
    n_units : the number of units (at least; a unit left without spikes joins nothing)
    """
    n = max(int(units.max()) + 1 if units.size else 0, n_units)
    parent = np.arange(n)
    if n < 2 or cfg.drift_merge_um <= 0:
        return parent
    edges = np.arange(times_s.min(), times_s.max() + cfg.drift_bin_s, cfg.drift_bin_s)
    if edges.size - 1 < MIN_DRIFT_BINS:  # too short to tell turns from chance
        log.info("%.0f s of spikes: too short to look for units split by drift", times_s.max() - times_s.min())
        return parent
    m = units >= 0
    loc = unit_medians(units, locations, n)  # a unit without spikes here has no position (NaN) and joins nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        wf = np.stack([peak_waveforms[m & (units == u)].mean(axis=0) for u in range(n)])
    wf /= np.maximum(np.linalg.norm(wf, axis=1, keepdims=True), 1e-9)
    counts = np.stack([np.histogram(times_s[m & (units == u)], edges)[0] for u in range(n)]).astype(np.float64)
    counts -= counts.mean(axis=1, keepdims=True)
    counts /= np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-9)
    corr = counts @ counts.T
    near = np.linalg.norm(loc[:, None] - loc[None], axis=2) <= cfg.drift_merge_um
    alike = wf @ wf.T >= cfg.drift_merge_similarity
    pairs = np.argwhere(np.triu(near & alike & (corr <= -cfg.drift_merge_anticorrelation), k=1))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in sorted(pairs.tolist(), key=lambda p: corr[p[0], p[1]]):  # most clearly taking turns first
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
            log.info("units %d and %d are one drifting neuron (%.0f um apart, waveform cosine %.2f, "
                     "count correlation %.2f): joined", a, b, np.linalg.norm(loc[a] - loc[b]),
                     float(wf[a] @ wf[b]), corr[a, b])
    if pieces:
        time_bin = np.minimum(((times_s - edges[0]) / cfg.drift_bin_s).astype(np.int64), edges.size - 2)
        motion = motion_trace(units, locations[:, 1], time_bin, edges.size - 1, n)
        log.info("the probe moved %.1f um over the recording (the units' median depth per %.0f s)",
                 np.ptp(motion), cfg.drift_bin_s)
    if pieces and np.ptp(motion) >= MIN_MOTION_UM:
        candidates = near & alike
        np.fill_diagonal(candidates, False)
        for b, a, d in locked_pieces(units, time_bin, motion, candidates):
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
                log.info("unit %d fires only at one depth of the drift (its motion rank %.2f from unit %d's, %.0f um "
                         "apart): a piece of unit %d, joined", b, d, a, np.linalg.norm(loc[a] - loc[b]), a)
    roots = np.array([root(i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1]


def tail_units(units: np.ndarray, samples: np.ndarray, locations: np.ndarray, size: np.ndarray,
               sampling_rate: float, cfg: ClusterConfig, n_units: int = 0) -> np.ndarray:
    """Units that are another unit's tails; return a bool mask over units.

    A big spike's late phase (its repolarisation, about 1 ms after the trough)
    crosses the detector's threshold too, on the same channels, and those
    events cluster into a unit of their own. Such a unit's spikes follow (or
    precede) a bigger unit's spikes at a lag between ``TAIL_MIN_LAG_MS`` and
    ``tail_max_lag_ms``: more than ``tail_fraction`` of them, where two
    independent neurons at 10 Hz share such a window for 2 % of their spikes.

    Parameters
    ----------
    units : (k,) int, unit of each spike (-1 = none)
    samples : (k,) int, sample index of each spike
    locations : (k, 2) um
    size : (n_units,) each unit's template peak in noise units (the bigger unit is the parent)
    """
    n = max(int(units.max()) + 1 if units.size else 0, n_units)
    tail = np.zeros(n, bool)
    if n < 2 or cfg.tail_fraction <= 0:
        return tail
    lo = int(round(TAIL_MIN_LAG_MS * sampling_rate / 1000.0))
    hi = int(round(cfg.tail_max_lag_ms * sampling_rate / 1000.0))
    trains = [np.sort(samples[units == u]) for u in range(n)]
    loc = unit_medians(units, locations, n)  # a unit without spikes has no position and is nobody's tail
    near = np.linalg.norm(loc[:, None] - loc[None], axis=2) <= TAIL_UM

    def share(t, parent, a, b):  # fraction of spikes t with a parent spike in [t + a, t + b]
        j = np.searchsorted(parent, t + a)
        return np.mean((j < parent.size) & (parent[np.minimum(j, parent.size - 1)] <= t + b))

    for b in range(n):
        for a in np.flatnonzero(near[b] & (size > size[b])):
            if trains[b].size == 0 or trains[a].size == 0:
                continue
            f = max(share(trains[b], trains[a], -hi, -lo), share(trains[b], trains[a], lo, hi))
            if f > cfg.tail_fraction:
                tail[b] = True
                log.info("unit %d (%d spikes, %.1f x noise) is unit %d's tail (%.1f x noise): %.0f %% of its spikes "
                         "lie %.1f-%.1f ms from one of unit %d's; dropped", b, trains[b].size, size[b], a, size[a],
                         100 * f, TAIL_MIN_LAG_MS, cfg.tail_max_lag_ms, a)
                break
    return tail


def centroids_and_radii(members: np.ndarray, groups: np.ndarray, n_groups: int, features: np.ndarray,
                        cfg: ClusterConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each group's mean feature vector and its rejection radius.

    The radius is ``reject_factor`` x the ``reject_quantile`` of the distances
    of the spikes (of ``features``) for which the group is the nearest centroid.
    ``members`` / ``groups``: the spikes that define the groups (-1 = none).
    """
    centroids = np.stack([members[groups == g].mean(axis=0) for g in range(n_groups)]).astype(np.float32)
    nearest, dist_all = Assigner(centroids, np.arange(n_groups), np.full(n_groups, np.inf)).assign(features)
    radius = np.empty(n_groups, dtype=np.float32)
    for g in range(n_groups):
        own = dist_all[nearest == g]
        radius[g] = cfg.reject_factor * np.quantile(own, cfg.reject_quantile) if own.size else 0.0
    return centroids, radius


def cluster(features: np.ndarray, xn: np.ndarray, channels: np.ndarray, channel_index: np.ndarray,
            positions: np.ndarray, cfg: ClusterConfig, seed: int = 0, times_s: np.ndarray | None = None,
            motion_um: np.ndarray | None = None) -> Clustering:
    """Cluster spikes into units and build the runtime's centroids (see the module docstring). ``times_s``: each
    spike's time; ``motion_um``: the displacement motion correction applied to it (None: none)."""
    n = features.shape[0]
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, cfg.max_spikes, replace=False)) if n > cfg.max_spikes else np.arange(n)
    groups = HDBSCAN(min_cluster_size=cfg.min_cluster_size, min_samples=cfg.min_samples,
                     cluster_selection_method=cfg.selection, copy=True).fit_predict(features[sub])
    log.info("HDBSCAN: %d groups from %d spikes (%.0f%% left as noise)", int(groups.max()) + 1, sub.size,
             100.0 * np.mean(groups < 0))
    if groups.max() >= 0 and cfg.split:
        before = int(groups.max()) + 1
        groups = split_groups(groups, xn[sub], channels[sub], channel_index, positions.shape[0], cfg, seed)
        log.info("split on their own channels: %d groups -> %d", before, int(groups.max()) + 1)
    n_groups = int(groups.max()) + 1
    if n_groups == 0:
        empty = np.zeros((0, features.shape[1]), np.float32)
        return Clustering(empty, np.zeros(0, np.int32), np.zeros(0, np.float32), np.full(n, -1, np.int32), 0)
    tm, counts = templates_on_probe(xn[sub], channels[sub], channel_index, groups, n_groups, positions.shape[0])
    if n_groups > 1:
        dist = template_distances(tm, counts)
        merged = unimodal_merges(groups, dist, tm, counts, xn[sub], channels[sub], channel_index, cfg, seed,
                                 None if times_s is None else np.asarray(times_s)[sub],
                                 None if motion_um is None else np.asarray(motion_um)[sub])
    else:
        merged = np.zeros(1, dtype=np.int64)
    if times_s is not None and n_groups > 1:
        spike_unit = np.where(groups >= 0, merged[groups], -1)
        merged = drift_merges(spike_unit, features[sub, -2:] * cfg.position_scale_um, xn[sub, :, 0],
                              np.asarray(times_s)[sub], cfg, int(merged.max()) + 1)[merged]
    # units numbered along the probe (by the position of their biggest channel)
    n_units = int(merged.max()) + 1
    utm, ucounts = templates_on_probe(xn[sub], channels[sub], channel_index, np.where(groups >= 0, merged[groups], -1),
                                      n_units, positions.shape[0])
    peak = np.abs(utm).max(axis=2).argmax(axis=1)
    order = np.lexsort((positions[peak, 0], positions[peak, 1]))
    unit_of_merged = np.empty(n_units, dtype=np.int32)
    unit_of_merged[order] = np.arange(n_units, dtype=np.int32)
    centroid_unit = unit_of_merged[merged]
    centroids, radius = centroids_and_radii(features[sub], groups, n_groups, features, cfg)
    labels = Assigner(centroids, centroid_unit, radius).assign(features)[0]
    log.info("%d groups merged into %d units; %.1f%% of spikes unassigned", n_groups, n_units,
             100.0 * np.mean(labels < 0))
    return Clustering(centroids, centroid_unit, radius, labels, n_groups)


def label_spikes(centroids, centroid_unit, radius, features, waveforms, xn, channels, channel_index, voltage_noise,
                 n_units: int, cfg: AssignConfig, core: np.ndarray | None = None):
    """The runtime's labels of the training spikes, and the templates (n_units, T, C) in uV it will fit.

    Mean waveforms of the nearest-centroid labels give a first template fit;
    the means of those labels are the templates kept, and the labels returned
    are what the runtime (without tracking) gives with them. Only the spikes
    in ``core`` (indices; default all) make the means: the other events are
    candidates, labelled by template fit alone as the runtime labels them
    (-1 when no template claims them), and do not shape the templates.

    The fit here is scale-free (``amplitude_prior`` 0): the templates are still
    being made, and a prior on their provisional size pulls the labels, and so
    the next means, towards it (on recording B a unit at SNR 3.3 was lost so).
    """
    cfg = replace(cfg, amplitude_prior=0.0)
    n_channels = channel_index.shape[0]
    keep = np.zeros(features.shape[0], bool)
    keep[slice(None) if core is None else core] = True

    def means(lab):
        lab = np.where(keep, lab, -1)
        return templates_on_probe(waveforms, channels, channel_index, lab, n_units, n_channels)[0].transpose(0, 2, 1)

    labels = np.where(keep, Assigner(centroids, centroid_unit, radius).assign(features)[0], -1)
    tm = means(labels)
    for r in range(2 if cfg.template_candidates > 0 else 0):
        if r:
            tm = means(labels)
        labels = make_assigner(centroids, centroid_unit, radius, tm, voltage_noise, channel_index, cfg,
                               0.0).label(features[keep], xn, channels, keep)[0]
    return labels, tm
