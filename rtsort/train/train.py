"""``rtsort train``: recording -> bundle.

Every phase uses the runtime's own objects where the runtime has one: the
front end cuts the snippets, the exported ONNX encoder (not torch) computes
the features that are clustered, and the runtime's assigner gives the labels
the quality metrics are computed on. What the bundle says about its units is
what the runtime will do.

The templates are made twice. The clusters' means come from the spikes deep
enough to be clustered, which for a weak unit means its spikes that noise
pushed over the threshold (too big on the peak channel) and a few of its
neighbours'. So the bundle first written with them sorts the training
recording through the runtime's pipeline, and each unit's template becomes
the mean filtered signal at the spikes that sort gives it, at every size
(``train.template_rounds``, :func:`refined_templates`); the labels and
metrics are then those of the templates kept.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..assign import make_assigner, template_channels
from ..bundle import load_bundle, save_bundle
from ..config import Config
from ..errors import RecordingError
from ..dsp import resolve_reference
from ..features import Encoder, Featurizer, normalize_waveforms
from ..frontend import FrontEnd, corrected_chunks, snippets_recording
from ..pipeline import late_phase, labelled, sort_recording, spikes_kept
from ..types import TAIL
from .cluster import cluster, drift_merges, label_spikes, small_units, tail_units, templates_on_probe
from .metrics import unit_metrics
from .motion import estimate_schedule

log = logging.getLogger("rtsort.train")

MIN_SPIKES = 100
ENCODE_BATCH = 4096
WINDOW_BATCH = 512  # window_means sums this many windows at a time


@dataclass
class TrainResult:
    bundle_dir: Path
    units: list
    spikes: np.ndarray  # the runtime's labels for the training recording (SPIKE_DTYPE)
    timings: dict
    history: dict


def fit_pca(x: np.ndarray, latent_dim: int, seed: int):
    from sklearn.decomposition import PCA

    pca = PCA(latent_dim, random_state=seed).fit(x.reshape(x.shape[0], -1))
    return pca.mean_.reshape(x.shape[1:]), pca.components_


def encode_all(featurizer: Featurizer, waveforms: np.ndarray, channels: np.ndarray, progress: bool):
    """(latents, locations) for every snippet, in batches, through the runtime's featurizer."""
    lat, loc = [], []
    for i in tqdm(range(0, waveforms.shape[0], ENCODE_BATCH), desc="encode", disable=not progress, leave=False):
        a, b = featurizer.parts(waveforms[i:i + ENCODE_BATCH], channels[i:i + ENCODE_BATCH])
        lat.append(a)
        loc.append(b)
    return np.concatenate(lat), np.concatenate(loc)


def window_means(recording, config: Config, noise: np.ndarray, starts: np.ndarray, units: np.ndarray,
                 templates: np.ndarray, length: int, progress: bool = True, desc: str = "templates", motion=None):
    """Each unit's mean of the filtered recording over ``length`` samples from each of its ``starts``, on its
    template's channels (the others stay 0), in one pass through the runtime's preprocessor: ((units, length,
    C) float32, how many windows each mean holds (units,)). Windows past the recording's end are left out. With a
    motion ``schedule`` the recording is read in its reference frame."""
    fs = recording.sampling_rate
    n_units, _, n_ch = templates.shape
    order = np.argsort(starts, kind="stable")
    start = np.asarray(starts, np.int64)[order]
    unit = np.asarray(units, np.int64)[order]
    ok = start >= 0
    start, unit = start[ok], unit[ok]
    unit_ch, n_unit_ch = template_channels(templates)  # each template's channels, the only ones summed
    sums = np.zeros((n_units, length, unit_ch.shape[1]), np.float64)
    counts = np.bincount(unit, minlength=n_units)
    pre = FrontEnd.for_recording(config, recording, noise_levels=noise, snippets=False).preprocessor
    carry = np.zeros((0, n_ch), np.float32)
    first, done = 0, 0  # the absolute sample of carry's first row; the windows added so far
    with tqdm(total=recording.n_samples, desc=desc, unit="sample", unit_scale=True, disable=not progress,
              leave=False) as bar:
        for n, filtered in corrected_chunks(pre, recording, int(fs), motion):
            buf = np.concatenate([carry, filtered])
            end = first + buf.shape[0]
            ready = done + int(np.searchsorted(start[done:], end - length, side="right"))
            for i in range(done, ready, WINDOW_BATCH):  # the windows now wholly in buf (later ones start after carry)
                by_unit = i + np.argsort(unit[i : min(i + WINDOW_BATCH, ready)], kind="stable")
                rows = (start[by_unit] - first)[:, None, None] + np.arange(length)[None, :, None]
                windows = buf[rows, np.maximum(unit_ch[unit[by_unit]], 0)[:, None, :]]  # (k, length, K)
                here, at = np.unique(unit[by_unit], return_index=True)
                sums[here] += np.add.reduceat(windows, at, axis=0)
            done = ready
            carry = buf[-length:].copy() if buf.shape[0] > length else buf.copy()
            first = end - carry.shape[0]
            bar.update(n)
    counts -= np.bincount(unit[done:], minlength=n_units)  # windows past the recording's end
    mean = sums / np.maximum(counts, 1)[:, None, None]
    out = np.zeros((n_units, length, n_ch), np.float32)
    for u, k in enumerate(n_unit_ch):
        out[u][:, unit_ch[u, :k]] = mean[u, :, :k]
    return out, counts


def late_templates(recording, config: Config, noise: np.ndarray, events, labels, templates: np.ndarray,
                   n_before: int, progress: bool = True, motion=None) -> np.ndarray:
    """``templates`` (units, T, C) in uV extended to ``assign.subtract_ms_after`` after the trough: each unit's
    mean of the filtered recording past the snippet's end, at its labelled events, on its template's channels.

    A spike's late phase (its repolarisation, a millisecond or more) outlasts the snippet; peeling subtracts
    the whole template, so the residual the search looks at no longer holds it. One more pass over the
    recording through the runtime's preprocessor.
    """
    n_units, t_len, _ = templates.shape
    length = max(t_len, n_before + int(round(config.assign.subtract_ms_after * recording.sampling_rate / 1000.0)) + 1)
    if length == t_len or n_units == 0 or not config.assign.peel:
        return templates
    m = labels >= 0
    tail, _ = window_means(recording, config, noise, events["sample_index"][m] - n_before + t_len, labels[m],
                           templates, length - t_len, progress, motion=motion)
    return np.concatenate([templates, tail], axis=1)


def refined_templates(recording, bundle: dict, rounds: int, progress: bool = True, motion=None) -> np.ndarray:
    """The templates of a bundle (``save_bundle``'s arguments) re-estimated ``rounds`` times from what the
    bundle itself sorts: each unit's mean of the filtered recording at the spikes the runtime gives it.

    The clusters' means come from the spikes deep enough to be clustered, so a
    weak unit's template is too big on its peak channel (the noise that took
    its spikes over the threshold) and holds some of its neighbours' spikes;
    the sort's spikes, candidates and matches included, are its spikes at
    every size. A unit the sort gives fewer than ``cluster.min_cluster_size``
    spikes keeps its template. The means are taken in the frame of the motion
    ``schedule`` when one is given (the sort tracks motion as the runtime does).
    """
    templates = bundle["templates"]
    config = bundle["config"]
    n_before = int(bundle["features"]["n_before"])
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            # the sort reads no unit table: a placeholder, whatever the caller's (curation's old one has other units)
            save_bundle(tmp, **{**bundle, "units": [{"unit": u} for u in range(templates.shape[0])], "training": {},
                                "templates": templates})
            spikes, _ = sort_recording(recording, load_bundle(tmp), progress=progress)
        spikes = spikes[spikes["unit"] >= 0]
        means, counts = window_means(recording, config, bundle["noise_levels"], spikes["sample_index"] - n_before,
                                     spikes["unit"], templates, templates.shape[1], progress, motion=motion)
        enough = counts >= config.cluster.min_cluster_size
        templates = np.where(enough[:, None, None], means, templates).astype(np.float32)
        log.info("templates re-estimated from the bundle's own sort (round %d of %d): %d spikes, %d of %d units",
                 r + 1, rounds, spikes.size, int(enough.sum()), enough.size)
    return templates


def unit_table(labels, n_units: int, events, waveforms, channel_index, features, loc, noise, recording, seed: int):
    """The unit table (metrics, flags, peak channel, position) and the mean waveforms (units, C, T) in uV."""
    tm_uv = templates_on_probe(waveforms, events["channel"], channel_index, labels, n_units, recording.n_channels)[0]
    tm_noise = tm_uv / noise[1][None, :, None]  # normalisation is per channel: the same mean, in noise units
    snr = np.abs(tm_noise).max(axis=(1, 2)) if n_units else np.zeros(0)
    units = unit_metrics(labels, events["sample_index"], events["amplitude"], features, snr, n_units,
                         recording.sampling_rate, recording.duration_s, seed)
    for row, t in zip(units, tm_uv):
        row["peak_channel"] = int(np.abs(t).max(axis=1).argmax())
        row["position_um"] = np.median(loc[labels == row["unit"]], axis=0).tolist() \
            if row["n_spikes"] else [float("nan")] * 2
    return units, tm_uv


def emitted_snippets(recording, config: Config, noise: np.ndarray, assigner, featurizer=None, progress: bool = True,
                     desc: str = "candidates", motion=None, templates=None, n_before: int = 0):
    """A pass over the recording, labelled chunk by chunk as the runtime labels it: the events it emits.

    With ``featurizer``, every spike and the candidates a template claims
    (what the runtime sends out); without, only the claimed candidates (for a
    caller that holds the spikes already; with a featurizer, ``templates`` and
    ``n_before`` give the late-phase rule). Memory holds those snippets only,
    not every noise crossing the detector hands over. Returns their events,
    snippets (uV) and units.
    """
    units = []  # the kept events' units, chunk by chunk, in the order their snippets are kept
    rule = []  # the late-phase rule, made for the first chunk's front end and kept for the stream

    def emitted(fe, ev, wf):
        deep = fe.spike_mask(ev)
        if featurizer is not None:
            if not rule:
                rule.append(late_phase(fe, templates, n_before, config.assign.late_phase_residual > 0))
            features, xn = featurizer.encode(wf, ev["channel"], deep)
            unit = assigner.label(features, xn, ev["channel"], deep)[0]
            keep = spikes_kept(deep, unit)
            keep &= ~rule[0](ev, unit, keep, deep)
        else:  # candidates only: no encoder needed (the caller applies the late-phase rule, with its spikes)
            unit = np.full(ev.size, -1, np.int32)
            cand = ~deep
            xn = normalize_waveforms(wf[cand], ev["channel"][cand], fe.snippets.channel_index, noise[1])
            unit[cand] = assigner.label(np.zeros((0, assigner.n_features), np.float32), xn, ev["channel"][cand],
                                        np.zeros(xn.shape[0], bool))[0]
            keep = unit >= 0
        units.append(unit[keep])
        return keep

    ev, wf, _ = snippets_recording(recording, config, progress=progress, noise_levels=noise, select=emitted,
                                   desc=desc, motion=motion)
    return ev, wf, np.concatenate(units) if units else np.zeros(0, np.int32)


def late_events(events, labels, fe, templates: np.ndarray, config: Config) -> np.ndarray:
    """Which of a recording's emitted events the runtime drops as an earlier spike's late phase
    (``rtsort.assign.LatePhase``, in one call: it gives what chunk after chunk gives)."""
    if config.assign.late_phase_residual <= 0:
        return np.zeros(events.size, bool)
    deep = fe.spike_mask(events)
    rule = late_phase(fe, templates, fe.snippets.nbefore)
    return rule(events, labels, spikes_kept(deep, labels), deep)


def _without(unit: np.ndarray, gone: np.ndarray, mark: int) -> np.ndarray:
    """Units (int32; negative ones kept as they are) renumbered 0..k-1 without the units ``gone``, whose entries
    become ``mark`` (TAIL: a tail's; -1: unassigned)."""
    new = np.where(gone, mark, np.cumsum(~gone) - 1)
    return np.where(unit >= 0, new[np.maximum(unit, 0)], unit).astype(np.int32)


def train_bundle(recording, out_dir: str | Path, config: Config | None = None, seed: int = 0,
                 progress: bool = True) -> TrainResult:
    """Train on ``recording`` and write a bundle to ``out_dir`` (see the module docstring).

    BLAS and OpenMP run on one thread here: a decomposition (the PCA encoder, the SVD that starts the Transformer's
    projection) sums in an order that depends on the thread count, and the same recording, configuration and seed
    must give the same bundle on a workstation and on a one-thread Dask worker. The Transformer's fit sets its own
    threads (``[train] threads``)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _train_bundle(recording, out_dir, config or Config(), seed, progress)


def _train_bundle(recording, out_dir: Path | str, config: Config, seed: int, progress: bool) -> TrainResult:
    out_dir = Path(out_dir)
    timings = {}
    t0 = time.perf_counter()
    log.info("common reference: %s", resolve_reference(config.preprocess.reference, recording.probe.positions_um))
    # the probe's motion over the recording: every pass below reads the recording in its reference frame
    schedule, motion_reference, motion_summary = estimate_schedule(recording, config, progress)
    timings["motion_s"] = time.perf_counter() - t0
    t0d = time.perf_counter()
    # units are learnt from the spikes; the shallower candidates are labelled afterwards, as at run time, in a
    # second pass that keeps only the claimed ones (memory holds spikes, not every noise crossing)
    events, waveforms, fe = snippets_recording(recording, config, progress=progress,
                                               select=lambda f, ev, wf: f.spike_mask(ev), motion=schedule)
    timings["detect_s"] = time.perf_counter() - t0d
    log.info("%d spikes in %.1f s (%.1f s to detect)", events.size, recording.duration_s, timings["detect_s"])
    if events.size < MIN_SPIKES:
        raise RecordingError(f"{recording.source}: only {events.size} spikes detected in "
                             f"{recording.duration_s:.1f} s; at least {MIN_SPIKES} are needed to train")
    snip = fe.snippets
    channels = events["channel"]
    noise = fe.noise_levels
    xn = normalize_waveforms(waveforms, channels, snip.channel_index, noise[1])
    rng = np.random.default_rng(seed)
    n_fit = min(events.size, config.train.max_snippets)
    fit_idx = np.sort(rng.choice(events.size, n_fit, replace=False))

    t1 = time.perf_counter()
    history: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        enc_path = Path(tmp) / "encoder.onnx"
        if config.train.features == "transformer":
            from .export import export_encoder
            from .fit import fit_autoencoder

            model, history = fit_autoencoder(xn[fit_idx], snip.relative_positions[channels[fit_idx]], config.train,
                                             seed, progress)
            history["onnx_max_abs_diff"] = export_encoder(model.encoder, enc_path, xn[fit_idx],
                                                          snip.relative_positions[channels[fit_idx]])
        else:
            from .export import export_linear

            export_linear(*fit_pca(xn[fit_idx], config.train.latent_dim, seed), enc_path)
        timings["fit_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        encoder = Encoder(enc_path, threads=1)
        featurizer = Featurizer(encoder, snip.channel_index, snip.relative_positions, recording.probe.positions_um,
                                noise[1], 1.0, config.cluster.position_scale_um)
        latent, loc = encode_all(featurizer, waveforms, channels, progress)
        # one feature unit = the spread of the latent's main direction
        top = np.linalg.eigvalsh(np.cov(latent[fit_idx], rowvar=False).astype(np.float64))[-1]
        featurizer.latent_scale = np.float32(1.0 / np.sqrt(max(top, 1e-12)))
        features = featurizer.combine(latent, loc)
        timings["encode_s"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        times_s = events["sample_index"] / recording.sampling_rate
        motion_um = None if schedule is None else schedule.at_spikes(events["sample_index"], channels)
        clu = cluster(features, xn, channels, snip.channel_index, recording.probe.positions_um, config.cluster, seed,
                      times_s=times_s, motion_um=motion_um)
        timings["cluster_s"] = time.perf_counter() - t3

        centroid_unit = clu.centroid_unit
        for rnd in range(3):  # the drift merge again on the final labels: every spike counts now, not a subsample
            n_units = int(centroid_unit.max()) + 1 if centroid_unit.size else 0
            labels, templates = label_spikes(clu.centroids, centroid_unit, clu.radius, features, waveforms, xn,
                                             channels, snip.channel_index, noise[1], n_units, config.assign)
            if n_units < 2 or rnd == 2:  # the labels and templates kept are those of the units kept
                break
            joined = drift_merges(labels, loc, xn[:, :, 0], times_s, config.cluster, n_units, pieces=True)
            if joined.max() + 1 == n_units:
                break
            centroid_unit = np.where(centroid_unit >= 0, joined[np.maximum(centroid_unit, 0)], -1).astype(np.int32)
        size = np.abs(templates / noise[1][None, None, :]).max(axis=(1, 2)) if n_units else np.zeros(0)
        tail = tail_units(labels, events["sample_index"], loc, size, recording.sampling_rate, config.cluster, n_units)
        if tail.any():  # a tail's centroids mark its events as tails: they do not leave, as at run time
            centroid_unit = _without(centroid_unit, tail, TAIL)
            n_units = int(np.count_nonzero(~tail))
            labels, templates = label_spikes(clu.centroids, centroid_unit, clu.radius, features, waveforms, xn,
                                             channels, snip.channel_index, noise[1], n_units, config.assign)
            spike = labels != TAIL
            events, waveforms, xn, features, loc, labels = (a[spike] for a in (events, waveforms, xn, features, loc,
                                                                            labels))
            log.info("%d events of %d tail units are not spikes", int(np.count_nonzero(~spike)), int(tail.sum()))
        features_meta = {
            "kind": config.train.features,
            "latent_dim": int(encoder.latent_dim),
            "latent_scale": float(featurizer.latent_scale),
            "position_scale_um": float(config.cluster.position_scale_um),
            "n_samples": int(snip.n_samples),
            "n_snippet_channels": int(snip.k_channels),
            "n_before": int(snip.nbefore),
        }
        # the bundle's templates: the spikes' means reaching the late phase, then re-estimated from the bundle's own
        # sort of this recording
        t4 = time.perf_counter()
        templates = late_templates(recording, config, noise, events, labels, templates, snip.nbefore, progress,
                                   motion=schedule)
        timings["templates_s"] = time.perf_counter() - t4
        bundle = dict(config=config, sampling_rate=recording.sampling_rate, probe=recording.probe,
                      noise_levels=noise, encoder_file=enc_path, centroids=clu.centroids,
                      centroid_unit=centroid_unit, centroid_radius=clu.radius, templates=templates,
                      features=features_meta, gain_to_uV=float(np.mean(recording.gains_to_uV)),
                      motion_reference=motion_reference)
        t5 = time.perf_counter()
        refine = bool(n_units and config.train.template_rounds)
        if refine:
            templates = bundle["templates"] = refined_templates(recording, bundle, config.train.template_rounds,
                                                                progress, motion=schedule)
        assigner = make_assigner(clu.centroids, centroid_unit, clu.radius, templates[:, :snip.n_samples], noise[1],
                                 snip.channel_index, config.assign, 0.0)
        if refine:  # the runtime's labels with the templates kept: the spikes' again, then the candidates they claim
            # (the same centroids: an event nearest a tail's centroid was dropped above and none is now)
            labels = assigner.label(features, xn, events["channel"], np.ones(events.size, bool))[0]
        timings["refine_s"] = time.perf_counter() - t5
        small = small_units(labels, n_units, config.cluster)
        if small.any():  # its centroids stay and leave their spikes unassigned (as a curated "noise" cluster's do)
            centroid_unit = _without(centroid_unit, small, -1)
            labels = _without(labels, small, -1).astype(labels.dtype)
            templates = bundle["templates"] = templates[~small]
            bundle["centroid_unit"] = centroid_unit
            log.info("%d of %d units keep fewer spikes than a cluster's least size (%d in the clustering's "
                     "subsample): their spikes are left unassigned", int(small.sum()), n_units,
                     config.cluster.min_cluster_size)
            n_units = int(np.count_nonzero(~small))
            assigner = make_assigner(clu.centroids, centroid_unit, clu.radius, templates[:, :snip.n_samples],
                                     noise[1], snip.channel_index, config.assign, 0.0)
        c_ev, c_wf, c_lab = emitted_snippets(recording, config, noise, assigner, progress=progress, motion=schedule)
        n_claimed = c_ev.size
        log.info("%d candidates claimed by a unit's template", n_claimed)
        if n_claimed:  # what the runtime emits: every spike, and the claimed candidates
            c_lat, c_loc = encode_all(featurizer, c_wf, c_ev["channel"], progress)
            events = np.concatenate([events, c_ev])
            waveforms = np.concatenate([waveforms, c_wf])
            features = np.concatenate([features, featurizer.combine(c_lat, c_loc)])
            loc = np.concatenate([loc, c_loc])
            labels = np.concatenate([labels, c_lab])
        late = late_events(events, labels, fe, templates, config)
        if late.any():  # a bigger spike's late phase: the runtime drops them as tails
            events, waveforms, features, loc, labels = (a[~late] for a in (events, waveforms, features, loc, labels))
            log.info("%d events are a bigger spike's late phase", int(late.sum()))
        units, _ = unit_table(labels, n_units, events, waveforms, snip.channel_index, features, loc, noise,
                              recording, seed)
        spikes = labelled(events, labels, np.zeros(events.size, np.float32))
        timings["total_s"] = time.perf_counter() - t0
        training = {
            "recording": str(recording.source),
            "duration_s": float(recording.duration_s),
            "n_spikes": int(events.size),
            "n_fit_snippets": int(n_fit),
            "n_groups": int(clu.n_groups),
            "n_candidates_claimed": int(n_claimed),
            "unassigned_fraction": float(np.mean(labels < 0)),
            "seed": int(seed),
            "motion": motion_summary,
            "history": history,
            "timings_s": timings,
        }
        save_bundle(out_dir, units=units, training=training, **bundle)
    log.info("bundle written to %s: %d units in %.1f s", out_dir, n_units, timings["total_s"])
    return TrainResult(out_dir, units, spikes, timings, history)
