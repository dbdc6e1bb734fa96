"""Nearest-centroid labelling with a rejection radius per centroid.

A unit may own several centroids (clusters merged into one unit at training
keep their own centroids, so a unit whose spikes peak on two channels is not
forced into one blob). A spike farther from its nearest centroid than that
centroid's radius is "unassigned" (-1), never guessed.
"""

from __future__ import annotations

import numba
import numpy as np

from .errors import BundleError


@numba.njit(cache=True, nogil=True)
def _nearest(features, centroids, centroid_unit, radius, rate, within, unit, dist):
    """Label spike by spike; with ``rate`` > 0 a confident spike pulls its centroid towards itself."""
    k, f_dim = features.shape
    for i in range(k):
        best = np.inf
        arg = 0
        for j in range(centroids.shape[0]):
            d = 0.0
            for f in range(f_dim):
                e = features[i, f] - centroids[j, f]
                d += e * e
            if d < best:
                best = d
                arg = j
        dist[i] = np.sqrt(best)
        unit[i] = centroid_unit[arg] if dist[i] <= radius[arg] else -1
        if rate > 0.0 and dist[i] <= within * radius[arg]:
            for f in range(f_dim):
                centroids[arg, f] += rate * (features[i, f] - centroids[arg, f])


class Assigner:
    """Label feature vectors by their nearest centroid.

    Parameters
    ----------
    centroids : ndarray (n, F) float32
    centroid_unit : ndarray (n,) int
        The unit each centroid belongs to.
    radius : ndarray (n,) float32
        Rejection distance of each centroid (inf = never reject).
    """

    def __init__(self, centroids, centroid_unit, radius, track_rate: float = 0.0, track_within: float = 0.5):
        self.centroids = np.array(centroids, dtype=np.float32, order="C")  # a copy: tracking moves it
        self.centroid_unit = np.asarray(centroid_unit, dtype=np.int32)
        self.radius = np.asarray(radius, dtype=np.float32)
        self.track_rate = np.float32(track_rate)
        self.track_within = np.float32(track_within)
        n = self.centroids.shape[0]
        if self.centroids.ndim != 2 or self.centroid_unit.shape != (n,) or self.radius.shape != (n,):
            raise BundleError(
                f"centroids {self.centroids.shape}, centroid units {self.centroid_unit.shape} and radii "
                f"{self.radius.shape} do not agree"
            )

    @property
    def n_features(self) -> int:
        return self.centroids.shape[1]

    def assign(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (unit (k,) int32 with -1 = unassigned, distance to the nearest centroid (k,) float32)."""
        k = features.shape[0]
        if k == 0 or self.centroids.shape[0] == 0:
            return np.full(k, -1, np.int32), np.full(k, np.inf, np.float32)
        unit = np.empty(k, np.int32)
        dist = np.empty(k, np.float32)
        _nearest(np.ascontiguousarray(features, dtype=np.float32), self.centroids, self.centroid_unit, self.radius,
                 self.track_rate, self.track_within, unit, dist)
        return unit, dist
