"""Small shared types: event dtypes, chunks and the probe.

Events are structured arrays with absolute ``int64`` sample indices, defined
once here so every stage addresses fields by name, never by column position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError

#: A detected event: trough sample (absolute), peak channel, trough amplitude (uV), and ``kind``, how it was found:
#: SLOPE (a sharp slope and its trough) or TROUGH (a trough no slope event explains: a candidate), both by
#: rtsort.detect, or MATCH (a unit's template, run over the residual as a matched filter: rtsort.peel).
EVENT_DTYPE = np.dtype([("sample_index", "<i8"), ("channel", "<i4"), ("amplitude", "<f4"), ("kind", "u1")])
SLOPE, TROUGH, MATCH = 0, 1, 2
# centroid_unit of a centroid of a unit's tails (training's tail_units): the late phase of a bigger spike, seen
# again; its events are not spikes and do not leave (-1 marks a centroid of noise, whose spikes leave unassigned)
TAIL = -2


# a labelled spike: the spikes contract's fields, the distance to the nearest centroid, ``confidence`` (the posterior
# probability of its unit under the template fit: rtsort.assign; NaN where no template fit chose it) and ``flags``
SPIKE_DTYPE = np.dtype([("sample_index", "<i8"), ("unit", "<i4"), ("channel", "<i4"), ("amplitude", "<f4"),
                        ("distance", "<f4"), ("confidence", "<f4"), ("flags", "u1")])
#: ``flags`` bits. PEELED: found by a later pass over the residual (a collision partner, a template match,
#: rtsort.peel); it leaves after its chunk's other spikes, with the chunk that made the residual final.
#: UNENCODED: its chunk arrived past the overload bound, so it leaves detected but unlabelled (-1).
#: CORRECTION: a new label for a spike emitted before, replacing the earlier event; no stage of the runtime
#: relabels an emitted spike, so none is sent.
FLAG_PEELED, FLAG_UNENCODED, FLAG_CORRECTION = 1, 2, 4


def empty_events(n: int = 0) -> np.ndarray:
    """Return an events array of length ``n`` (``EVENT_DTYPE``)."""
    return np.zeros(n, dtype=EVENT_DTYPE)


@dataclass
class Chunk:
    """A block of consecutive samples from a source.

    Parameters
    ----------
    samples : ndarray of shape (n_samples, n_channels)
        Raw (int16/float32) or filtered (float32, uV) samples.
    first_sample : int
        Absolute index of ``samples[0]`` since the start of the stream.
    timestamp : float or None
        Time of ``samples[0]`` on the source's clock (seconds), when known.
    """

    samples: np.ndarray
    first_sample: int
    timestamp: float | None = None

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def stop_sample(self) -> int:
        """One past the absolute index of the last sample."""
        return self.first_sample + self.n_samples


@dataclass(frozen=True)
class Probe:
    """Channel geometry.

    Parameters
    ----------
    positions_um : ndarray of shape (n_channels, 2), float64
        Contact positions in micrometres, in channel order.
    channel_ids : tuple of str
        Channel names, in channel order.
    """

    positions_um: np.ndarray
    channel_ids: tuple = field(default=())

    def __post_init__(self):
        pos = np.asarray(self.positions_um, dtype=np.float64)
        if pos.ndim != 2 or pos.shape[1] not in (2, 3) or pos.shape[0] == 0:
            raise ConfigError(f"channel positions must have shape (n_channels, 2), got {pos.shape}")
        if not np.all(np.isfinite(pos)):
            raise ConfigError("channel positions contain NaN or infinite values")
        object.__setattr__(self, "positions_um", pos[:, :2].copy())
        ids = tuple(str(c) for c in self.channel_ids) if len(self.channel_ids) else tuple(
            str(i) for i in range(pos.shape[0])
        )
        if len(ids) != pos.shape[0]:
            raise ConfigError(f"{len(ids)} channel ids for {pos.shape[0]} channel positions")
        object.__setattr__(self, "channel_ids", ids)

    @property
    def n_channels(self) -> int:
        return int(self.positions_um.shape[0])

    def distances(self) -> np.ndarray:
        """Pairwise contact distances, shape (n_channels, n_channels), float64 um."""
        d = self.positions_um[:, None, :] - self.positions_um[None, :, :]
        return np.sqrt((d**2).sum(-1))

    def neighbours(self, radius_um: float) -> np.ndarray:
        """Channels within ``radius_um`` of each channel (itself included).

        Returns
        -------
        ndarray of shape (n_channels, max_neighbours), int32
            Neighbour indices in ascending channel order, padded with -1.
        """
        mask = self.distances() <= radius_um
        width = int(mask.sum(1).max())
        out = np.full((self.n_channels, width), -1, dtype=np.int32)
        for c in range(self.n_channels):
            idx = np.flatnonzero(mask[c])
            out[c, : idx.size] = idx
        return out

    def nearest(self, k: int) -> np.ndarray:
        """The ``k`` nearest channels of each channel, itself first, by distance.

        Ties are broken by channel index, so the order is deterministic.

        Returns
        -------
        ndarray of shape (n_channels, k), int32
        """
        k = min(int(k), self.n_channels)
        d = self.distances()
        order = np.lexsort((np.broadcast_to(np.arange(self.n_channels), d.shape), d), axis=1)
        return order[:, :k].astype(np.int32)
