"""Quality metrics per unit (the definitions SpikeInterface and Allen's ecephys pipeline use).

Units that fail a threshold are flagged in the unit table, never deleted:
curation decides.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.stats import chi2
from sklearn.metrics import silhouette_samples

THRESHOLDS = {  # metric: (comparison, limit) a good unit satisfies
    "snr": (">=", 4.0),
    "isi_violations_ratio": ("<=", 0.5),
    "presence_ratio": (">=", 0.9),
    "amplitude_cutoff": ("<=", 0.1),
}
ISI_THRESHOLD_MS = 1.5
MIN_ISI_MS = 0.0


def isi_violations(times_s: np.ndarray, duration_s: float, threshold_ms: float = ISI_THRESHOLD_MS):
    """(count, ratio): ISIs under the threshold, and Hill et al.'s ratio (1 = as many as a Poisson unit)."""
    n = times_s.size
    count = int(np.sum(np.diff(np.sort(times_s)) < threshold_ms / 1000.0))
    if n < 2:
        return count, 0.0
    window = 2.0 * (threshold_ms - MIN_ISI_MS) / 1000.0
    return count, float(count * duration_s / (n * n * window))


def presence_ratio(times_s: np.ndarray, duration_s: float) -> float:
    """Fraction of time bins (60 s, or a tenth of a short recording) with at least one spike."""
    bin_s = min(60.0, duration_s / 10.0)
    n_bins = max(1, int(np.floor(duration_s / bin_s)))
    hist = np.histogram(times_s, bins=n_bins, range=(0.0, n_bins * bin_s))[0]
    return float(np.mean(hist > 0))


def amplitude_cutoff(amplitudes: np.ndarray, n_bins: int = 100, sigma: float = 3.0) -> float:
    """Hill et al.'s estimate of the fraction of spikes lost below the detection threshold (at most 0.5)."""
    a = np.abs(amplitudes)
    if a.size < 20:
        return float("nan")
    pdf, edges = np.histogram(a, bins=n_bins, density=True)
    pdf = gaussian_filter1d(pdf, sigma)
    peak = int(np.argmax(pdf))
    g = peak + int(np.argmin(np.abs(pdf[peak:] - pdf[0])))
    return float(min(np.sum(pdf[g:]) * (edges[1] - edges[0]), 0.5))


def isolation(features: np.ndarray, labels: np.ndarray, unit: int) -> tuple[float, float]:
    """(isolation distance, L-ratio) of one unit by Mahalanobis distance in feature space."""
    own = features[labels == unit]
    other = features[labels != unit]
    n, dim = own.shape
    if n <= dim or other.shape[0] == 0:
        return float("nan"), float("nan")
    cov = np.cov(own, rowvar=False) + 1e-6 * np.eye(dim)
    inv = np.linalg.inv(cov)
    diff = other - own.mean(axis=0)
    d2 = np.einsum("ij,jk,ik->i", diff, inv, diff)
    iso = float(np.sort(d2)[n - 1]) if other.shape[0] >= n else float("nan")
    return iso, float(np.sum(chi2.sf(d2, dim)) / n)


def unit_metrics(labels: np.ndarray, sample_index: np.ndarray, amplitudes: np.ndarray, features: np.ndarray,
                 snr: np.ndarray, n_units: int, sampling_rate: float, duration_s: float, seed: int = 0,
                 max_silhouette: int = 5000) -> list[dict]:
    """The unit table: one dict per unit with every metric and the names of the thresholds it fails."""
    rng = np.random.default_rng(seed)
    assigned = np.flatnonzero(labels >= 0)
    sil = np.full(n_units, np.nan)
    if np.unique(labels[assigned]).size >= 2:
        pick = np.sort(rng.choice(assigned, min(max_silhouette, assigned.size), replace=False))
        if np.unique(labels[pick]).size >= 2:
            s = silhouette_samples(features[pick], labels[pick])
            for u in range(n_units):
                m = labels[pick] == u
                if m.any():
                    sil[u] = float(s[m].mean())
    table = []
    for u in range(n_units):
        m = labels == u
        times = sample_index[m] / sampling_rate
        count, ratio = isi_violations(times, duration_s)
        iso, lratio = isolation(features, labels, u)
        row = {
            "unit": u,
            "n_spikes": int(m.sum()),
            "firing_rate_hz": float(m.sum() / duration_s),
            "snr": float(snr[u]),
            "isi_violations_count": count,
            "isi_violations_ratio": ratio,
            "presence_ratio": presence_ratio(times, duration_s),
            "amplitude_cutoff": amplitude_cutoff(amplitudes[m]),
            "isolation_distance": iso,
            "l_ratio": lratio,
            "silhouette": float(sil[u]),
        }
        row["flags"] = [name for name, (op, limit) in THRESHOLDS.items()
                        if np.isfinite(row[name]) and not (row[name] >= limit if op == ">=" else row[name] <= limit)]
        table.append(row)
    return table
