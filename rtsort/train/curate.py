"""Apply a Phy curation to a bundle: merged clusters become one unit, "noise" clusters become -1.

The curated folder (from :func:`rtsort.io.phy.export_phy`, edited in Phy)
relabels the spikes. Their features are recomputed through the bundle's own
front end and encoder, and the bundle's centroids are rebuilt from the new
labels: one centroid for every (old centroid, curated cluster) pair with at
least ``min_cluster_size`` spikes, so merges, splits and reassignments all
carry over; pairs in a "noise" cluster keep a centroid labelled -1, so the
runtime leaves such spikes unassigned instead of handing them to a
neighbour. Units are renumbered 0..n-1 in the order of their Phy cluster ids;
each unit row records its ``phy_cluster`` and ``phy_group``. The curated
templates are then re-estimated from the curated bundle's own sort, as
training's are (``train.template_rounds``), and the unit table's metrics are
those of the labels the curated bundle gives with them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..assign import Assigner, make_assigner
from ..bundle import load_bundle, manifest_digest, save_bundle
from ..errors import BundleError
from ..features import normalize_waveforms
from ..frontend import FrontEnd
from ..io.phy import read_curation
from ..pipeline import make_featurizer, spikes_kept
from ..types import TAIL
from .cluster import centroids_and_radii, label_spikes
from .train import emitted_snippets, encode_all, late_events, late_templates, refined_templates, unit_table

log = logging.getLogger("rtsort.train")

NOISE = "noise"
MAX_PEELED = 0.2  # Phy's spikes beyond the bundle's first-pass spikes: at most this share (peeled collisions)


def _rows_of(times: np.ndarray, samples: np.ndarray) -> np.ndarray | None:
    """The row of sorted ``times`` holding each of the sorted ``samples`` (the k-th of equal samples takes the
    k-th equal time), or None when one is missing."""
    if samples.size == 0:
        return np.zeros(0, np.int64)
    new = np.r_[True, samples[1:] != samples[:-1]]
    start = np.maximum.accumulate(np.where(new, np.arange(samples.size), 0))
    rows = np.searchsorted(times, samples) + (np.arange(samples.size) - start)
    ok = (rows < times.size) & (times[np.minimum(rows, times.size - 1)] == samples)
    return rows if ok.all() else None


def apply_curation(bundle_dir, phy_dir, recording, out_dir, progress: bool = True) -> dict:
    """Write a curated copy of a bundle to ``out_dir``; return a summary of what changed."""
    b = load_bundle(bundle_dir)
    times, clusters, groups, info = read_curation(phy_dir)
    if info.get("bundle_manifest_sha256") != manifest_digest(b.path):
        raise BundleError(f"{phy_dir} was exported from bundle {info.get('bundle')}, not from {b.path}")
    b.check_recording(recording)
    # the spikes the bundle emitted (Phy's spikes), labelled chunk by chunk with the bundle's own featurizer
    fe = FrontEnd.for_recording(b.config, recording, b.noise_levels)
    ci = fe.snippets.channel_index
    featurizer = make_featurizer(b, fe)
    exported = make_assigner(b.centroids, b.centroid_unit, b.centroid_radius,
                             b.templates[:, :fe.snippets.n_samples], b.noise_levels[1], ci, b.config.assign, 0.0)
    events, waveforms, _ = emitted_snippets(recording, b.config, b.noise_levels, exported, featurizer, progress,
                                            "exported spikes", templates=b.templates,
                                            n_before=int(b.features["n_before"]))
    order = np.lexsort((events["channel"], events["sample_index"]))  # the spikes file's order
    events, waveforms = events[order], waveforms[order]
    latent, loc = encode_all(featurizer, waveforms, events["channel"], progress)
    features = featurizer.combine(latent, loc)
    xn = normalize_waveforms(waveforms, events["channel"], ci, b.noise_levels[1])
    deep = fe.spike_mask(events)
    rows = _rows_of(times, events["sample_index"])
    if rows is None or times.size > (1.0 + MAX_PEELED) * events.size:
        raise BundleError(f"{phy_dir}: its {times.size} spikes are not this bundle's {events.size} spikes of "
                          f"{recording.source} (another recording, or a folder edited outside Phy)")
    clusters = clusters[rows]  # Phy also shows the peeled spikes (rtsort.peel): they follow the new templates
    old = Assigner(b.centroids, np.arange(b.centroids.shape[0]), np.full(b.centroids.shape[0], np.inf)) \
        .assign(features)[0]
    kept = sorted(c for c in np.unique(clusters) if groups.get(int(c), "unsorted") != NOISE)
    unit_of_cluster = {int(c): i for i, c in enumerate(kept)}
    span = int(clusters.max()) + 1
    ids, inverse, counts = np.unique(old.astype(np.int64) * span + clusters, return_inverse=True, return_counts=True)
    big = counts >= b.config.cluster.min_cluster_size
    n_groups = int(big.sum())
    if n_groups == 0:
        raise BundleError(f"{phy_dir}: no cluster keeps {b.config.cluster.min_cluster_size} spikes")
    group_of_pair = np.full(ids.size, -1, np.int64)
    group_of_pair[big] = np.arange(n_groups)
    groups_of_spike = group_of_pair[inverse]
    cluster_of_group = ids[big] % span  # each kept (old centroid, curated cluster) pair's cluster
    centroid_unit = np.array([unit_of_cluster.get(int(c), -1) for c in cluster_of_group], np.int32)
    centroids, radius = centroids_and_radii(features, groups_of_spike, n_groups, features, b.config.cluster)
    tails = b.centroid_unit == TAIL  # not in Phy (their events never left): they keep marking tails
    centroids = np.concatenate([centroids, b.centroids[tails]])
    radius = np.concatenate([radius, b.centroid_radius[tails]])
    centroid_unit = np.concatenate([centroid_unit, b.centroid_unit[tails]]).astype(np.int32)
    labels, templates = label_spikes(centroids, centroid_unit, radius, features, waveforms, xn, events["channel"],
                                     ci, b.noise_levels[1], len(kept), b.config.assign, np.flatnonzero(deep))
    t_len = fe.snippets.n_samples

    def assigner(templates):
        return make_assigner(centroids, centroid_unit, radius, templates[:, :t_len], b.noise_levels[1], ci,
                             b.config.assign, 0.0)

    def emitted(labels, templates):  # which events the curated bundle emits: not the late phases it leaves
        return spikes_kept(deep, labels) & ~late_events(events, labels, fe, templates, b.config)

    now = emitted(labels, templates)
    templates = late_templates(recording, b.config, b.noise_levels, events[now], labels[now], templates,
                               fe.snippets.nbefore, progress)
    contents = b.contents()
    contents.update(centroids=centroids, centroid_unit=centroid_unit, centroid_radius=radius, templates=templates)
    if b.config.train.template_rounds and len(kept):  # as training: from the curated bundle's own sort
        templates = contents["templates"] = refined_templates(recording, contents, b.config.train.template_rounds,
                                                              progress)
        # the runtime's labels with the templates kept (the spikes Phy showed; candidates as they were claimed)
        curated = assigner(templates)
        labels = curated.label(features[deep], xn, events["channel"], deep)[0]
        now = emitted(labels, templates)
    units, _ = unit_table(labels[now], len(kept), events[now], waveforms[now], ci, features[now], loc[now],
                          b.noise_levels, recording, 0)
    for row, c in zip(units, kept):
        row["phy_cluster"] = int(c)
        row["phy_group"] = groups.get(int(c), "unsorted")
    summary = {"phy_dir": str(Path(phy_dir).resolve()), "units_before": b.n_units, "units_after": len(kept),
               "noise_clusters": sorted(int(c) for c in np.unique(clusters) if groups.get(int(c)) == NOISE),
               "centroids": n_groups, "tail_centroids": int(tails.sum()),
               "unassigned_fraction": float(np.mean(labels[now] < 0))}
    contents["training"]["curation"] = summary
    contents["units"] = units
    save_bundle(out_dir, **contents)
    log.info("curated bundle written to %s: %d units -> %d, %d centroids", out_dir, b.n_units, len(kept), n_groups)
    return summary
