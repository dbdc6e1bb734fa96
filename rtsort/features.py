"""Per-spike features, shared by training and the runtime: no torch here.

A spike's feature vector is its encoder latent (from ``encoder.onnx``, run
with onnxruntime) next to its position on the probe, each scaled so that one
unit of distance means the same in both::

    features = [latent * latent_scale, location_um / position_scale_um]

The encoder sees snippets in noise units (each channel divided by its voltage
noise from the bundle) and the snippet channels' positions relative to the
peak channel, so one model serves any probe layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numba
import numpy as np

from .errors import BundleError

log = logging.getLogger("rtsort.features")

WAVEFORMS_INPUT = "waveforms"  # (B, T, K) float32, noise units
POSITIONS_INPUT = "positions"  # (B, K, 2) float32, um relative to the peak channel
LATENT_OUTPUT = "latent"  # (B, D) float32


def normalize_waveforms(waveforms: np.ndarray, channels: np.ndarray, channel_index: np.ndarray,
                        voltage_noise: np.ndarray) -> np.ndarray:
    """Divide each snippet channel by its voltage noise: (k, T, K) uV -> noise units (float32)."""
    inv = (1.0 / voltage_noise).astype(np.float32)  # inf noise (flat channel) -> 0
    return waveforms * inv[channel_index[channels]][:, None, :]


LOCATION_FLOOR = 3.0  # noise units of peak-to-peak below which a channel does not pull a spike's position


@numba.njit(cache=True, nogil=True)
def _prepare(waveforms, channels, channel_index, inv_noise, positions, relative_positions, floor, xn, rel, loc):
    """One pass per spike: noise units, the snippet channels' relative positions, and the spike's position."""
    k, t_len, n_k = waveforms.shape
    for i in range(k):
        c = channels[i]
        sw = 0.0
        ox = 0.0
        oy = 0.0
        for j in range(n_k):
            g = inv_noise[channel_index[c, j]]
            lo = np.inf
            hi = -np.inf
            for t in range(t_len):
                v = waveforms[i, t, j] * g
                xn[i, t, j] = v
                lo = min(lo, v)
                hi = max(hi, v)
            rx = relative_positions[c, j, 0]
            ry = relative_positions[c, j, 1]
            rel[i, j, 0] = rx
            rel[i, j, 1] = ry
            w = max(hi - lo - floor, 0.0) ** 2
            if j == 0:
                w += 1e-6  # a spike with nothing above the floor sits on its peak channel
            sw += w
            ox += w * rx
            oy += w * ry
        loc[i, 0] = positions[c, 0] + ox / sw
        loc[i, 1] = positions[c, 1] + oy / sw


def spike_locations(xn: np.ndarray, channels: np.ndarray, positions: np.ndarray,
                    relative_positions: np.ndarray, floor: float = LOCATION_FLOOR) -> np.ndarray:
    """Spike positions (k, 2) in um: centre of mass of the squared peak-to-peak over the snippet channels.

    Channels below ``floor`` noise units of peak-to-peak do not count, so noise
    does not pull the estimate towards the snippet's centre. (The NumPy
    reference of what :class:`Featurizer` computes in one compiled pass.)
    """
    if xn.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.float32)
    ptp = xn.max(axis=1) - xn.min(axis=1)  # (k, K)
    w = np.maximum(ptp - floor, 0.0) ** 2
    w[:, 0] += 1e-6
    offset = np.einsum("kc,kcd->kd", w, relative_positions[channels]) / w.sum(axis=1)[:, None]
    return (positions[channels] + offset).astype(np.float32)


class Encoder:
    """An ONNX encoder run by onnxruntime on a fixed number of threads.

    Parameters
    ----------
    path : path to ``encoder.onnx``
    threads : int
        ``intra_op_num_threads``; inter-op parallelism is off (sequential execution).
    """

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{path}: not a loadable ONNX encoder ({exc})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        if WAVEFORMS_INPUT not in inputs:
            raise BundleError(f"{path}: encoder has no '{WAVEFORMS_INPUT}' input (inputs: {sorted(inputs)})")
        self.uses_positions = POSITIONS_INPUT in inputs
        outputs = self.session.get_outputs()
        if len(outputs) != 1:
            raise BundleError(f"{path}: encoder must have one output, has {len(outputs)}")
        self.latent_dim = outputs[0].shape[-1]
        shape = inputs[WAVEFORMS_INPUT].shape
        self.input_shape = tuple(shape[1:])
        self._out = [outputs[0].name]

    def __call__(self, xn: np.ndarray, relative_positions: np.ndarray | None = None) -> np.ndarray:
        """Latents (k, D) for noise-normalised snippets (k, T, K) and their relative positions (k, K, 2)."""
        feed = {WAVEFORMS_INPUT: np.ascontiguousarray(xn, dtype=np.float32)}
        if self.uses_positions:
            feed[POSITIONS_INPUT] = np.ascontiguousarray(relative_positions, dtype=np.float32)
        return self.session.run(self._out, feed)[0]


class Featurizer:
    """Snippets -> feature vectors for nearest-centroid labelling (the same code offline and online).

    Parameters
    ----------
    encoder : Encoder
    channel_index : ndarray (C, K)
        Snippet channels of each peak channel (from the snippet extractor).
    relative_positions : ndarray (C, K, 2)
    positions : ndarray (C, 2)
        Channel positions in um.
    voltage_noise : ndarray (C,)
    latent_scale, position_scale_um : float
    """

    def __init__(self, encoder: Encoder, channel_index, relative_positions, positions, voltage_noise,
                 latent_scale: float, position_scale_um: float):
        self.encoder = encoder
        self.channel_index = np.ascontiguousarray(channel_index, dtype=np.int64)
        self.relative_positions = np.ascontiguousarray(relative_positions, dtype=np.float32)
        self.positions = np.ascontiguousarray(positions, dtype=np.float32)
        self.voltage_noise = np.asarray(voltage_noise, dtype=np.float32)
        with np.errstate(divide="ignore"):
            self._inv_noise = (1.0 / self.voltage_noise).astype(np.float32)  # inf noise (flat channel) -> 0
        self.latent_scale = np.float32(latent_scale)
        self.position_scale = np.float32(position_scale_um)
        self.n_features = int(encoder.latent_dim) + 2

    def prepare(self, waveforms: np.ndarray, channels: np.ndarray):
        """(snippets in noise units (k, T, K), relative positions (k, K, 2), locations (k, 2) um) of uV snippets."""
        k, t_len, n_k = waveforms.shape
        xn = np.empty((k, t_len, n_k), np.float32)
        rel = np.empty((k, n_k, 2), np.float32)
        loc = np.empty((k, 2), np.float32)
        _prepare(np.ascontiguousarray(waveforms, dtype=np.float32), np.ascontiguousarray(channels, dtype=np.int64),
                 self.channel_index, self._inv_noise, self.positions, self.relative_positions,
                 np.float32(LOCATION_FLOOR), xn, rel, loc)
        return xn, rel, loc

    def parts(self, waveforms: np.ndarray, channels: np.ndarray):
        """(latents (k, D), locations (k, 2) um) of a batch of snippets (k, T, K) uV."""
        xn, rel, loc = self.prepare(waveforms, channels)
        return self.encoder(xn, rel), loc

    def combine(self, latent: np.ndarray, locations: np.ndarray) -> np.ndarray:
        out = np.empty((latent.shape[0], latent.shape[1] + 2), np.float32)
        np.multiply(latent, self.latent_scale, out=out[:, :-2])
        np.divide(locations, self.position_scale, out=out[:, -2:])
        return out

    def encode(self, waveforms: np.ndarray, channels: np.ndarray,
               which: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(feature vectors (k, D + 2), snippets in noise units (k, T, K)) of a batch of snippets (k, T, K) uV.

        With ``which`` (k,) bool only those snippets are encoded: the features have one row per True.
        """
        xn, rel, loc = self.prepare(waveforms, channels)
        if which is not None and not which.all():
            rel, loc = rel[which], loc[which]
            xe = xn[which]
        else:
            xe = xn
        if xe.shape[0] == 0:
            return np.zeros((0, self.n_features), dtype=np.float32), xn
        return self.combine(self.encoder(xe, rel), loc), xn

    def __call__(self, waveforms: np.ndarray, channels: np.ndarray) -> np.ndarray:
        """Feature vectors (k, D + 2) of a batch of snippets (k, T, K) uV."""
        return self.encode(waveforms, channels)[0]
