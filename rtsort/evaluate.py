"""Detection quality against ground truth.

Per unit: recall (true spikes with a detection within ``tolerance_ms`` on a
channel within ``radius_um`` of the unit's peak channel) and SNR (peak of the
unit's mean filtered waveform over the noise of its peak channel, both measured
on the preprocessed data the detector sees). Overall: precision (detections
that match some true spike the same way), the false-positive rate
(1 - precision) and per second, and F1.
"""

from __future__ import annotations

import numba
import numpy as np

from .detect import mad_noise

SNR_BINS = ((3.0, 5.0), (5.0, 8.0), (8.0, 15.0), (15.0, np.inf))


def bin_label(lo: float, hi: float) -> str:
    return f"[{lo:g}, {hi:g})" if np.isfinite(hi) else f">= {lo:g}"


def unit_templates(filtered: np.ndarray, truth_index: np.ndarray, truth_unit: np.ndarray, n_units: int,
                   half_width: int) -> np.ndarray:
    """Mean filtered waveform per unit around its true spike times.

    Returns
    -------
    ndarray of shape (n_units, 2 * half_width + 1, n_channels), float32
    """
    n, n_ch = filtered.shape
    out = np.zeros((n_units, 2 * half_width + 1, n_ch), dtype=np.float64)
    counts = np.zeros(n_units)
    ok = (truth_index >= half_width) & (truth_index < n - half_width)
    offsets = np.arange(-half_width, half_width + 1)
    for u in range(n_units):
        idx = truth_index[ok & (truth_unit == u)]
        if idx.size == 0:
            continue
        idx = idx[:2000]
        out[u] = filtered[idx[:, None] + offsets[None, :]].mean(0)
        counts[u] = idx.size
    return out.astype(np.float32)


@numba.njit(cache=True)
def _match(det_t, det_c, tru_t, tru_u, unit_chan_ok, tol):
    """Greedy-free matching flags: for each true spike, is there a detection within tol on an
    allowed channel; for each detection, is there such a true spike. Both sorted by time."""
    n_det = det_t.shape[0]
    n_tru = tru_t.shape[0]
    hit = np.zeros(n_tru, dtype=np.bool_)
    good = np.zeros(n_det, dtype=np.bool_)
    j0 = 0
    for i in range(n_tru):
        t = tru_t[i]
        while j0 < n_det and det_t[j0] < t - tol:
            j0 += 1
        j = j0
        while j < n_det and det_t[j] <= t + tol:
            if unit_chan_ok[tru_u[i], det_c[j]]:
                hit[i] = True
                good[j] = True
            j += 1
    return hit, good


class GroundTruth:
    """What scoring needs from the truth, computed once per recording.

    Per unit: the mean filtered waveform's peak channel and SNR (peak over the
    MAD noise of that channel, on the data the detectors see), and which
    channels count as "nearby" (within ``radius_um`` of the peak channel).

    Parameters
    ----------
    truth_index, truth_unit : ndarray of shape (n_spikes,)
    filtered : ndarray of shape (n_samples, n_channels), float32
        The preprocessed recording the detectors saw.
    valid_stop : int, optional
        True spikes at or after this sample are ignored (the detector's undecided tail).
    """

    def __init__(self, truth_index, truth_unit, filtered, positions_um, sampling_rate, tolerance_ms=0.4,
                 radius_um=75.0, n_units=None, valid_stop=None):
        self.n_units = int(truth_unit.max()) + 1 if n_units is None else n_units
        self.sampling_rate = float(sampling_rate)
        self.tol = int(round(tolerance_ms * sampling_rate / 1000.0))
        half = int(round(1.0 * sampling_rate / 1000.0))
        self.valid_stop = filtered.shape[0] if valid_stop is None else valid_stop
        keep = (truth_index >= half) & (truth_index < self.valid_stop - half)
        truth_index, truth_unit = truth_index[keep], truth_unit[keep]
        templates = unit_templates(filtered, truth_index, truth_unit, self.n_units, half)
        noise = mad_noise(filtered)
        peak_per_chan = np.abs(templates).max(axis=1)  # (units, channels)
        peak_channel = peak_per_chan.argmax(axis=1)
        self.snr = peak_per_chan[np.arange(self.n_units), peak_channel] / noise[peak_channel]
        dist = np.linalg.norm(positions_um[:, None, :2] - positions_um[None, :, :2], axis=2)
        self.unit_chan_ok = dist[peak_channel] <= radius_um
        order = np.argsort(truth_index, kind="stable")
        self.tru_t = truth_index[order].astype(np.int64)
        self.tru_u = truth_unit[order].astype(np.int64)

    def score(self, events: np.ndarray) -> dict:
        """Recall per SNR bin, precision, false positives and F1 of ``events`` (EVENT_DTYPE)."""
        snr, tru_u = self.snr, self.tru_u
        ev = events[events["sample_index"] < self.valid_stop]
        det_t = ev["sample_index"].astype(np.int64)
        det_c = ev["channel"].astype(np.int64)
        dorder = np.argsort(det_t, kind="stable")
        hit, good = _match(det_t[dorder], det_c[dorder], self.tru_t, tru_u, self.unit_chan_ok, self.tol)
        recall_unit = [float(hit[tru_u == u].mean()) if np.any(tru_u == u) else float("nan")
                       for u in range(self.n_units)]
        bins = {}
        for lo, hi in SNR_BINS:
            sel = (snr[tru_u] >= lo) & (snr[tru_u] < hi)
            bins[bin_label(lo, hi)] = {
                "n_units": int(((snr >= lo) & (snr < hi)).sum()),
                "n_spikes": int(sel.sum()),
                "recall": float(hit[sel].mean()) if sel.any() else None,
            }
        n_det = int(det_t.size)
        precision = float(good.mean()) if n_det else 0.0
        sel5 = snr[tru_u] >= 5
        recall_all = float(hit.mean()) if hit.size else 0.0
        f1 = 2 * precision * recall_all / (precision + recall_all) if precision + recall_all else 0.0
        return {
            "n_detections": n_det,
            "n_true_spikes": int(self.tru_t.size),
            "recall": recall_all,
            "recall_snr_ge_5": float(hit[sel5].mean()) if sel5.any() else 0.0,
            "precision": precision,
            "false_positive_rate": 1.0 - precision if n_det else 0.0,
            "false_positives_per_s": float((~good).sum() / (self.valid_stop / self.sampling_rate)),
            "f1": f1,
            "recall_by_snr": bins,
            "unit_snr": snr.astype(float).tolist(),
            "unit_recall": recall_unit,
        }


def detection_quality(events: np.ndarray, truth_index: np.ndarray, truth_unit: np.ndarray,
                      filtered: np.ndarray, positions_um: np.ndarray, sampling_rate: float, **kwargs) -> dict:
    """Score one set of events against the truth (see :class:`GroundTruth` for the arguments)."""
    return GroundTruth(truth_index, truth_unit, filtered, positions_um, sampling_rate, **kwargs).score(events)


def compare_detectors(filtered: np.ndarray, truth_index: np.ndarray, truth_unit: np.ndarray, probe, sampling_rate,
                      detect_cfg, noise_levels=None, valid_stop: int | None = None) -> dict:
    """rtsort's gradient detector and SpikeInterface's locally_exclusive (defaults) on the same data.

    Returns ``{"rtsort_gradient": scores, "si_locally_exclusive": scores}`` (see
    :meth:`GroundTruth.score`). Without ``noise_levels`` the detector calibrates on
    ``detect_cfg.noise_window_s`` of ``filtered``. rtsort's events are its
    spikes: candidates (``candidate_threshold``) only become spikes when a
    unit's template claims them, which a detector alone cannot do.
    """
    from dataclasses import replace

    from .detect import GradientDetector

    det = GradientDetector(replace(detect_cfg, candidate_threshold=0.0, trough_threshold=0.0), probe, sampling_rate,
                           noise_levels)
    if noise_levels is None:
        det.calibrate(filtered[: int(detect_cfg.noise_window_s * sampling_rate)])
    truth = GroundTruth(truth_index, truth_unit, filtered, probe.positions_um, sampling_rate,
                        valid_stop=valid_stop)
    return {
        "rtsort_gradient": truth.score(det.process(filtered)),
        "si_locally_exclusive": truth.score(detect_locally_exclusive(filtered, probe.positions_um, sampling_rate)),
    }


def detect_locally_exclusive(filtered: np.ndarray, positions_um: np.ndarray, sampling_rate: float,
                             **method_kwargs) -> np.ndarray:
    """SpikeInterface's ``detect_peaks(method="locally_exclusive")`` with its defaults, on the same data.

    Returns events in rtsort's EVENT_DTYPE (amplitude in uV from the data).
    """
    from spikeinterface.core import NumpyRecording
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks

    from .types import EVENT_DTYPE

    rec = NumpyRecording([np.ascontiguousarray(filtered)], sampling_frequency=sampling_rate)
    rec.set_dummy_probe_from_locations(np.asarray(positions_um)[:, :2])
    kwargs = dict(noise_levels=mad_noise(filtered))
    kwargs.update(method_kwargs)
    peaks = detect_peaks(rec, method="locally_exclusive", method_kwargs=kwargs,
                         job_kwargs=dict(n_jobs=1, chunk_duration="1s", progress_bar=False))
    ev = np.zeros(peaks.size, dtype=EVENT_DTYPE)
    ev["sample_index"] = peaks["sample_index"]
    ev["channel"] = peaks["channel_index"]
    ev["amplitude"] = peaks["amplitude"]
    return ev


# ---------------------------------------------------------------- sorting accuracy
WELL_DETECTED = 0.8


def _comparison(spike_index, spike_unit, truth_index, truth_unit, sampling_rate: float, delta_ms: float):
    """SpikeInterface's ground-truth comparison of labelled spikes: (the comparison, the sorting)."""
    import spikeinterface.core as si
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    gt = si.NumpySorting.from_samples_and_labels([np.asarray(truth_index, np.int64)],
                                                 [np.asarray(truth_unit, np.int64)], sampling_rate)
    so = si.NumpySorting.from_samples_and_labels([np.asarray(spike_index, np.int64)],
                                                 [np.asarray(spike_unit, np.int64)], sampling_rate)
    return compare_sorter_to_ground_truth(gt, so, delta_time=delta_ms, exhaustive_gt=True), so


def sorting_accuracy(spike_index: np.ndarray, spike_unit: np.ndarray, truth_index: np.ndarray,
                     truth_unit: np.ndarray, sampling_rate: float, delta_ms: float = 0.4) -> dict:
    """SpikeInterface's ground-truth comparison of a sorting (unit -1 = unassigned, left out).

    Accuracy per true unit = TP / (TP + FN + FP) against its best-matching sorted
    unit; "well detected" = accuracy >= 0.8; a false-positive unit is a sorted
    unit matched to no true unit.
    """
    keep = spike_unit >= 0
    cmp, so = _comparison(spike_index[keep], spike_unit[keep], truth_index, truth_unit, sampling_rate, delta_ms)
    perf = cmp.get_performance(method="by_unit")
    units = []
    for uid, row in perf.iterrows():
        match = cmp.best_match_12.get(uid, -1) if hasattr(cmp, "best_match_12") else -1
        units.append({"unit": int(uid), "accuracy": float(row["accuracy"]), "precision": float(row["precision"]),
                      "recall": float(row["recall"]), "n_spikes": int(np.sum(truth_unit == uid)),
                      "best_match": int(match) if match is not None and match != -1 else -1})
    acc = np.array([u["accuracy"] for u in units])
    summary = {
        "n_true_units": len(units),
        "n_sorted_units": int(len(so.unit_ids)),
        "well_detected": int(np.sum(acc >= WELL_DETECTED)),
        "mean_accuracy": float(acc.mean()) if acc.size else 0.0,
        "median_accuracy": float(np.median(acc)) if acc.size else 0.0,
        "false_positive_units": int(len(cmp.get_false_positive_units())),
        "unassigned_fraction": float(np.mean(~keep)) if keep.size else 0.0,
        "delta_ms": delta_ms,
    }
    return {"summary": summary, "units": units}


def right_labels(spikes: np.ndarray, truth_index: np.ndarray, truth_unit: np.ndarray, fs: float,
                 delta_ms: float = 0.4) -> np.ndarray:
    """For each spike with a unit (``spikes["unit"] >= 0``, in order): does a true spike of the true unit its
    sorted unit is matched to (SpikeInterface's comparison, Hungarian matching) lie within ``delta_ms``? The
    spikes of a sorted unit matched to no true unit are wrong."""
    lab = spikes[spikes["unit"] >= 0]
    cmp, _ = _comparison(lab["sample_index"], lab["unit"], truth_index, truth_unit, fs, delta_ms)
    match = {int(k): int(v) for k, v in cmp.hungarian_match_21.items()}  # sorted unit -> true unit or -1
    tol = int(round(delta_ms * fs / 1000.0))
    right = np.zeros(lab.size, bool)
    for u, g in match.items():
        if g < 0:
            continue
        mine = np.flatnonzero(lab["unit"] == u)
        far = np.iinfo(np.int64).max // 4
        times = np.concatenate([[-far], np.sort(truth_index[truth_unit == g]).astype(np.int64), [far]])
        t = lab["sample_index"][mine].astype(np.int64)
        j = np.searchsorted(times, t)  # in 1 .. len - 1: the sentinels bound every t
        right[mine] = np.minimum(times[j] - t, t - times[j - 1]) <= tol
    return right
