"""Summaries of a run's measurements: percentiles of an array, and :class:`Distribution`, which keeps them in
constant memory however long a live run lasts."""

from __future__ import annotations

import numpy as np

QUANTILES = (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))  # reported with max and mean


def percentiles(values, scale: float = 1.0) -> dict:
    """p50 / p90 / p99 / p99.9 / max and mean of ``values`` x ``scale`` ({} when empty)."""
    v = np.asarray(values, dtype=np.float64) * scale
    if v.size == 0:
        return {}
    out = {name: float(np.percentile(v, q)) for name, q in QUANTILES}
    out["max"] = float(v.max())
    out["mean"] = float(v.mean())
    return out


class Distribution:
    """A run's values (seconds, say) in constant memory, whatever the run's length: exact count, mean, min and
    max; percentiles from a histogram of bins ``RATIO`` wide on a log scale (0.5 % relative error) for either
    sign. Values wait in a short list and are binned a block at a time, so adding one costs about 0.2 us.
    """

    RATIO = 1.01
    LOW, HIGH = 1e-9, 1e6  # magnitudes outside go to the first / last bin (min and max stay exact)
    BLOCK = 4096

    def __init__(self):
        self._log_ratio = np.log(self.RATIO)
        self._n_bins = int(np.ceil(np.log(self.HIGH / self.LOW) / self._log_ratio)) + 1
        self._pos = np.zeros(self._n_bins, np.int64)
        self._neg = np.zeros(self._n_bins, np.int64)
        self._zero = 0
        self.count, self._sum = 0, 0.0
        self.min, self.max = np.inf, -np.inf
        self._waiting = []

    def add_one(self, value: float) -> None:
        self._waiting.append(value)
        if len(self._waiting) >= self.BLOCK:
            self._flush()

    def add(self, values) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if len(self._waiting) + v.size >= self.BLOCK:
            self._flush()
            self._bin(v)
        else:
            self._waiting.extend(v.tolist())

    def _flush(self) -> None:
        self._bin(np.array(self._waiting, dtype=np.float64))
        self._waiting = []

    def _bin(self, v: np.ndarray) -> None:
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        self.count += v.size
        self._sum += float(v.sum())
        self.min, self.max = min(self.min, float(v.min())), max(self.max, float(v.max()))
        for hist, m in ((self._pos, v[v > 0]), (self._neg, -v[v < 0])):
            if m.size:
                i = np.clip(np.floor(np.log(np.maximum(m, self.LOW) / self.LOW) / self._log_ratio), 0,
                            self._n_bins - 1).astype(np.int64)
                hist += np.bincount(i, minlength=self._n_bins)
        self._zero += int(np.count_nonzero(v == 0))

    def merge(self, other: "Distribution") -> "Distribution":
        """Add another distribution's values (its bins, count, sum, min and max) to this one; returns self."""
        self._flush()
        other._flush()
        self._pos += other._pos
        self._neg += other._neg
        self._zero += other._zero
        self.count += other.count
        self._sum += other._sum
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        return self

    @property
    def total(self) -> float:
        """The exact sum of the (finite) values."""
        self._flush()
        return self._sum

    def percentiles(self, scale: float = 1.0) -> dict:
        """p50 / p90 / p99 / p99.9 / max and mean x ``scale``, as :func:`percentiles` gives ({} when empty)."""
        self._flush()
        if self.count == 0:
            return {}
        mid = self.LOW * self.RATIO ** (np.arange(self._n_bins) + 0.5)  # each bin's geometric centre
        values = np.concatenate([-mid[::-1], [0.0], mid])
        counts = np.concatenate([self._neg[::-1], [self._zero], self._pos])
        cum = np.cumsum(counts)
        out = {}
        for name, q in QUANTILES:
            rank = q / 100.0 * (self.count - 1)  # as np.percentile ranks, to the bin holding that value
            v = values[int(np.searchsorted(cum, rank, side="right"))]
            out[name] = float(min(max(v, self.min), self.max)) * scale
        out["max"] = self.max * scale
        out["mean"] = self._sum / self.count * scale
        return out
