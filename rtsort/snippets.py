"""Waveform snippets around each trough, cut from a ring buffer across chunks.

An event waits until its post-trough samples (``ms_after``) have arrived; that
wait is the algorithmic latency and is reported per event. Waveforms come out
as ``(k, T, K)``: T samples (``ms_before`` + ``ms_after``) over the K channels
nearest the peak channel, ordered by distance (the peak channel first), with
their positions relative to the peak channel for the model.
"""

from __future__ import annotations

import numba
import numpy as np

from .config import SnippetConfig
from .errors import ConfigError
from .types import EVENT_DTYPE, Probe


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _gather(ring, mask, chunk, chunk_start, troughs, chans, nbefore, out):
    """Copy waveforms into ``out`` (k, T, K): samples before ``chunk_start`` come from the ring."""
    k, n_t, n_k = out.shape
    for e in range(k):
        t0 = troughs[e] - nbefore
        for i in range(n_t):
            t = t0 + i
            if t >= chunk_start:
                row = t - chunk_start
                for j in range(n_k):
                    out[e, i, j] = chunk[row, chans[e, j]]
            else:
                r = t & mask
                for j in range(n_k):
                    out[e, i, j] = ring[r, chans[e, j]]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _store(ring, mask, chunk, chunk_start, keep):
    """Write the last ``keep`` samples of ``chunk`` into the ring at their absolute positions."""
    n = chunk.shape[0]
    first = max(0, n - keep)
    for row in range(first, n):
        r = (chunk_start + row) & mask
        for c in range(chunk.shape[1]):
            ring[r, c] = chunk[row, c]


class SnippetExtractor:
    """Cut snippets for events as soon as their post-trough samples have arrived.

    Parameters
    ----------
    cfg : SnippetConfig
    probe : Probe
    sampling_rate : float
    max_event_age : int or sequence of int
        The oldest an event's trough can be, in samples behind the newest
        sample, when the event is handed in (the detector's look-ahead); a
        sequence gives it per event ``kind`` (``rtsort.types``).

    Events leave in one order whatever the chunking: an event is due
    ``max(nafter - 1, its kind's age)`` samples after its trough (by then it
    has been handed in and its snippet is complete), and the events of a
    chunk leave by due sample, then trough, then channel.
    """

    def __init__(self, cfg: SnippetConfig, probe: Probe, sampling_rate: float, max_event_age=0):
        self.cfg = cfg
        self.sampling_rate = float(sampling_rate)
        self.nbefore = int(round(cfg.ms_before * sampling_rate / 1000.0))
        self.nafter = int(round(cfg.ms_after * sampling_rate / 1000.0))
        if self.nafter < 1:
            raise ConfigError(f"snippets.ms_after ({cfg.ms_after} ms) is shorter than one sample")
        self.n_samples = self.nbefore + self.nafter
        self.n_channels = probe.n_channels
        self.channel_index = probe.nearest(cfg.n_channels)  # (C, K) nearest channels, self first
        self.k_channels = self.channel_index.shape[1]
        pos = probe.positions_um
        self.relative_positions = (pos[self.channel_index] - pos[:, None, :]).astype(np.float32)  # (C, K, 2)
        ages = np.atleast_1d(np.asarray(max_event_age, dtype=np.int64))
        self._due = np.maximum(ages, self.nafter - 1)  # samples from trough to due, per kind
        self._no_waveforms = np.empty((0, self.n_samples, self.k_channels), np.float32)  # shared by empty chunks
        self._no_wait = np.zeros(0, np.int64)
        # history kept before each chunk: enough for the oldest pending or late event
        self._keep = self.nbefore + self.nafter + int(ages.max()) + 1
        size = 1
        while size < self._keep:
            size *= 2
        self._ring = np.zeros((size, self.n_channels), dtype=np.float32)
        self._mask = size - 1
        self._pending = np.zeros(0, dtype=EVENT_DTYPE)
        self._next_sample = 0

    @property
    def max_wait(self) -> int:
        """The most samples an event leaves after its trough (its due): post-trough samples or its kind's age."""
        return int(self._due.max())

    @property
    def due_spread(self) -> int:
        """The most samples by which one event's due (trough to leaving) exceeds another's."""
        return int(self._due.max() - self._due.min())

    @property
    def wait_ms(self) -> float:
        """Post-trough wait for the samples after the trough (algorithmic latency floor)."""
        return (self.nafter - 1) * 1000.0 / self.sampling_rate

    def reset(self, first_sample: int = 0) -> None:
        self._ring[:] = 0
        self._pending = np.zeros(0, dtype=EVENT_DTYPE)
        self._next_sample = int(first_sample)

    @property
    def n_pending(self) -> int:
        return int(self._pending.size)

    def process(self, filtered: np.ndarray, first_sample: int, events: np.ndarray):
        """Add a chunk and its events; return the events now complete and their waveforms.

        Parameters
        ----------
        filtered : ndarray of shape (n_samples, n_channels), float32
        first_sample : int
            Absolute index of ``filtered[0]``; chunks must be consecutive.
        events : ndarray of EVENT_DTYPE
            New events (troughs up to the end of this chunk).

        Returns
        -------
        events : ndarray of EVENT_DTYPE, shape (k,)
        waveforms : ndarray of shape (k, T, K), float32
        wait : ndarray of shape (k,), int64
            Samples between each trough and the last sample of this chunk, when
            its snippet left (the algorithmic latency, chunking included).
        """
        n = filtered.shape[0]
        if first_sample != self._next_sample:
            raise ConfigError(
                f"snippet extractor expected sample {self._next_sample}, got a chunk starting at {first_sample}"
            )
        stop = first_sample + n
        if self._pending.size == 0 and events.size == 0:  # most chunks of a live stream: keep the samples only
            _store(self._ring, self._mask, filtered, first_sample, self._keep)
            self._next_sample = stop
            return events, self._no_waveforms, self._no_wait
        pending = np.concatenate([self._pending, events]) if self._pending.size else events
        if pending.size and pending["sample_index"].min() - self.nbefore < first_sample - self._keep:
            raise ConfigError("an event is older than the snippet ring buffer holds (max_event_age too small)")
        due = pending["sample_index"] + self._due[np.minimum(pending["kind"], self._due.size - 1)]
        ready = due < stop
        order = np.flatnonzero(ready)
        if order.size > 1:
            order = order[np.lexsort((pending["channel"][order], pending["sample_index"][order], due[order]))]
        out_ev = pending[order]
        self._pending = pending[~ready]
        k = out_ev.size
        waveforms = np.empty((k, self.n_samples, self.k_channels), dtype=np.float32)
        if k:
            chans = self.channel_index[out_ev["channel"]]
            _gather(self._ring, self._mask, filtered, first_sample, out_ev["sample_index"], chans,
                    self.nbefore, waveforms)
        _store(self._ring, self._mask, filtered, first_sample, self._keep)
        self._next_sample = stop
        # snippets leave at the end of the chunk that completed them: the wait includes chunking
        wait = (stop - 1 - out_ev["sample_index"]).astype(np.int64)
        return out_ev, waveforms, wait

    def warmup(self) -> None:
        """Compile the kernels without changing the state."""
        ring = np.zeros((4, self.n_channels), dtype=np.float32)
        chunk = np.zeros((2, self.n_channels), dtype=np.float32)
        out = np.empty((2, self.n_samples, self.k_channels), dtype=np.float32)
        ev = np.zeros(2, EVENT_DTYPE)  # two: a one-element field would pass as contiguous
        ev["sample_index"] = self.nbefore
        for troughs in (ev["sample_index"], np.ascontiguousarray(ev["sample_index"])):  # a field, as process passes
            _gather(ring, 3, chunk, 0, troughs, self.channel_index[:1][[0, 0]], self.nbefore, out)
        _store(ring, 3, chunk, 0, 1)


def extract_reference(filtered: np.ndarray, events: np.ndarray, cfg: SnippetConfig, probe: Probe,
                      sampling_rate: float) -> np.ndarray:
    """Waveforms cut by plain slicing of a whole array (tests' reference); x[t < 0] = 0."""
    nb = int(round(cfg.ms_before * sampling_rate / 1000.0))
    na = int(round(cfg.ms_after * sampling_rate / 1000.0))
    chans = probe.nearest(cfg.n_channels)
    padded = np.vstack([np.zeros((nb, filtered.shape[1]), np.float32), filtered])
    out = np.empty((events.size, nb + na, chans.shape[1]), dtype=np.float32)
    for i, e in enumerate(events):
        s = int(e["sample_index"])
        out[i] = padded[s : s + nb + na][:, chans[e["channel"]]]
    return out
