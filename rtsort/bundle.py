"""The bundle: everything the runtime needs to sort a stream, in one directory.

``manifest.json`` holds the schema version, the probe (sampling rate, channel
ids and positions), every preprocessing / detection / snippet parameter, the
per-channel noise levels, the feature scaling, the unit table with its quality
metrics, and the sha256 of every other file. Arrays are ``.npy`` (loaded with
``allow_pickle=False``); the encoder is ``encoder.onnx``. Loading checks all of
it and refuses a mismatch with both values in the message.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .config import Config
from .errors import BundleError, ConfigError
from .types import TAIL, Probe

log = logging.getLogger("rtsort.bundle")

SCHEMA = "rtsort-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ENCODER = "encoder.onnx"
ARRAYS = ("centroids", "centroid_unit", "centroid_radius", "templates")
MOTION_REFERENCE = "motion_reference"  # optional array


def manifest_digest(bundle_dir: str | Path) -> str:
    """The sha256 of a bundle directory's manifest (what a Phy folder and a live swap record of the bundle)."""
    return hashlib.sha256((Path(bundle_dir) / MANIFEST).read_bytes()).hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    """A loaded, validated bundle (see the module docstring).

    Arrays: ``centroids`` (n, D + 2), ``centroid_unit`` (n,), ``centroid_radius``
    (n,), ``templates`` (n_units, T, C) mean waveforms in uV, ``noise_levels``
    (2, C): slope noise and voltage noise in uV.
    """

    path: Path
    config: Config
    sampling_rate: float
    probe: Probe
    noise_levels: np.ndarray
    centroids: np.ndarray
    centroid_unit: np.ndarray
    centroid_radius: np.ndarray
    templates: np.ndarray
    features: dict
    units: list
    manifest: dict = field(default_factory=dict)
    motion_reference: np.ndarray | None = None  # (n_y, n_a) spikes/s per depth x amplitude bin (rtsort.motion)

    @property
    def n_channels(self) -> int:
        return self.probe.n_channels

    @property
    def gain_to_uV(self) -> float:
        """The training recording's (mean) gain: the scale assumed for integer streams that do not give one."""
        return float(self.manifest.get("gain_to_uV", 1.0))

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def encoder_path(self) -> Path:
        return self.path / ENCODER

    def contents(self) -> dict:
        """:func:`save_bundle`'s arguments that write this bundle again (``training`` included)."""
        return dict(config=self.config, sampling_rate=self.sampling_rate, probe=self.probe,
                    noise_levels=self.noise_levels, encoder_file=self.encoder_path, centroids=self.centroids,
                    centroid_unit=self.centroid_unit, centroid_radius=self.centroid_radius, templates=self.templates,
                    features=self.features, units=self.units, training=dict(self.manifest.get("training", {})),
                    gain_to_uV=self.gain_to_uV, motion_reference=self.motion_reference)

    def check_stream(self, n_channels: int, sampling_rate: float, source: str = "the stream") -> None:
        """Refuse a stream whose channel count or sampling rate differs from the bundle's."""
        if int(n_channels) != self.n_channels:
            raise BundleError(f"{source} has {n_channels} channels but the bundle {self.path} expects "
                              f"{self.n_channels}")
        if abs(float(sampling_rate) - self.sampling_rate) > 1e-6 * self.sampling_rate:
            raise BundleError(f"{source} is sampled at {sampling_rate:g} Hz but the bundle {self.path} expects "
                              f"{self.sampling_rate:g} Hz")

    def check_recording(self, recording) -> None:
        """Channel count, sampling rate and channel positions of a recording against the bundle."""
        self.check_stream(recording.n_channels, recording.sampling_rate, str(recording.source))
        pos = np.asarray(recording.probe.positions_um, dtype=np.float64)
        if not np.allclose(pos, self.probe.positions_um, atol=1e-3):
            i = int(np.argmax(np.abs(pos - self.probe.positions_um).max(axis=1)))
            raise BundleError(f"{recording.source}: channel {i} is at {pos[i].tolist()} um but the bundle "
                              f"{self.path} has it at {self.probe.positions_um[i].tolist()} um")


def save_bundle(out_dir: str | Path, *, config: Config, sampling_rate: float, probe: Probe, noise_levels,
                encoder_file: str | Path, centroids, centroid_unit, centroid_radius, templates, features: dict,
                units: list, training: dict, gain_to_uV: float = 1.0, motion_reference=None) -> Path:
    """Write a bundle directory (the encoder file is moved in); the manifest is written last.

    ``motion_reference`` (optional): the motion tracker's reference histogram, ``motion_reference.npy``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {
        "centroids": np.asarray(centroids, dtype=np.float32),
        "centroid_unit": np.asarray(centroid_unit, dtype=np.int32),
        "centroid_radius": np.asarray(centroid_radius, dtype=np.float32),
        "templates": np.asarray(templates, dtype=np.float32),
    }
    (out / MANIFEST).unlink(missing_ok=True)  # a half-written bundle has no manifest
    src = Path(encoder_file)
    if src.resolve() != (out / ENCODER).resolve():
        (out / ENCODER).write_bytes(src.read_bytes())
    if motion_reference is not None:
        arrays[MOTION_REFERENCE] = np.asarray(motion_reference, dtype=np.float32)
    else:
        (out / f"{MOTION_REFERENCE}.npy").unlink(missing_ok=True)
    for name, a in arrays.items():
        np.save(out / f"{name}.npy", a, allow_pickle=False)
    files = [ENCODER] + [f"{name}.npy" for name in arrays]
    noise = np.asarray(noise_levels, dtype=np.float64)
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "rtsort_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sampling_rate": float(sampling_rate),
        "gain_to_uV": float(gain_to_uV),
        "n_channels": probe.n_channels,
        "channel_ids": [str(c) for c in probe.channel_ids],
        "channel_positions_um": np.asarray(probe.positions_um, dtype=float).tolist(),
        "config": config.to_dict(),
        "noise_levels": {"slope_uV": _finite_list(noise[0]), "voltage_uV": _finite_list(noise[1])},
        "features": features,
        "units": units,
        "training": training,
        "files": {name: sha256(out / name) for name in files},
    }
    (out / MANIFEST).write_text(json.dumps(_jsonable(manifest), indent=1) + "\n")
    return out


def _finite_list(a: np.ndarray) -> list:
    """JSON has no inf: a flat channel's infinite noise is written as null."""
    return [float(v) if np.isfinite(v) else None for v in a]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def _need(manifest: dict, key: str, path: Path):
    if key not in manifest:
        raise BundleError(f"{path}: manifest has no '{key}'")
    return manifest[key]


def load_bundle(path: str | Path) -> Bundle:
    """Load and validate a bundle; every problem is a one-line :class:`BundleError`."""
    path = Path(path)
    try:
        return _load_bundle(path)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        # a hand-edited manifest: a value of the wrong type or shape
        raise BundleError(f"{path / MANIFEST}: invalid manifest ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from None


def _load_bundle(path: Path) -> Bundle:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found")
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: not a bundle (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: invalid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise BundleError(f"{mpath}: not an rtsort bundle manifest (schema {manifest.get('schema')!r})"
                          if isinstance(manifest, dict) else f"{mpath}: not an rtsort bundle manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{mpath}: schema version {version!r}, this rtsort ({__version__}) reads "
                          f"{SCHEMA_VERSION}")
    files = _need(manifest, "files", path)
    for name in [ENCODER] + [f"{a}.npy" for a in ARRAYS]:
        if name not in files:
            raise BundleError(f"{mpath}: {name} is not listed in 'files'")
    for name, digest in files.items():
        f = path / name
        if Path(name).name != name:
            raise BundleError(f"{mpath}: file name {name!r} must not contain a directory")
        if not f.is_file():
            raise BundleError(f"{path}: {name} is missing")
        got = sha256(f)
        if got != digest:
            raise BundleError(f"{f}: sha256 {got[:12]}... does not match the manifest's {str(digest)[:12]}... "
                              f"(file changed or corrupt)")
    arrays = {}
    for name in ARRAYS:
        try:
            arrays[name] = np.load(path / f"{name}.npy", allow_pickle=False)
        except ValueError as exc:
            raise BundleError(f"{path / (name + '.npy')}: unreadable ({exc})") from None
    try:
        config = Config.from_dict(_need(manifest, "config", path))
    except ConfigError as exc:
        raise BundleError(f"{mpath}: {exc}") from None
    n_channels = int(_need(manifest, "n_channels", path))
    positions = np.asarray(_need(manifest, "channel_positions_um", path), dtype=np.float64)
    if positions.shape != (n_channels, 2):
        raise BundleError(f"{mpath}: channel_positions_um has shape {positions.shape}, expected ({n_channels}, 2)")
    ids = manifest.get("channel_ids") or [str(i) for i in range(n_channels)]
    probe = Probe(positions, [str(i) for i in ids])
    sampling_rate = float(_need(manifest, "sampling_rate", path))
    if not sampling_rate > 0:
        raise BundleError(f"{mpath}: sampling_rate must be > 0, got {sampling_rate}")
    nl = _need(manifest, "noise_levels", path)
    noise = np.array([[np.inf if v is None else v for v in nl.get(k, [])] for k in ("slope_uV", "voltage_uV")],
                     dtype=np.float32)
    if noise.shape != (2, n_channels):
        raise BundleError(f"{mpath}: noise levels have shape {noise.shape}, expected (2, {n_channels})")
    features = _need(manifest, "features", path)
    units = _need(manifest, "units", path)
    if not isinstance(features, dict) or not isinstance(units, list):
        raise BundleError(f"{mpath}: 'features' must be a table and 'units' a list")
    for key in ("latent_dim", "latent_scale", "position_scale_um", "n_samples", "n_snippet_channels", "n_before"):
        v = features.get(key)
        if key in ("latent_dim", "latent_scale", "position_scale_um", "n_before") and v is None:
            raise BundleError(f"{mpath}: features has no '{key}'")
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)):
            raise BundleError(f"{mpath}: features.{key} must be a number, got {v!r}")
    gain = manifest.get("gain_to_uV", 1.0)
    if not (isinstance(gain, (int, float)) and not isinstance(gain, bool) and np.isfinite(gain) and gain > 0):
        raise BundleError(f"{mpath}: gain_to_uV must be a positive number, got {gain!r}")
    c, cu, cr, tm = (arrays[a] for a in ARRAYS)
    n_feat = int(features.get("latent_dim", -1)) + 2
    if c.ndim != 2 or c.shape[1] != n_feat:
        raise BundleError(f"{path}: centroids.npy has shape {c.shape}, expected (n, {n_feat})")
    if cu.shape != (c.shape[0],) or cr.shape != (c.shape[0],):
        raise BundleError(f"{path}: {c.shape[0]} centroids but {cu.shape} units and {cr.shape} radii")
    if cu.size and (cu.min() < TAIL or cu.max() >= len(units)):  # -1: a "noise" centroid; TAIL: a unit's tails
        raise BundleError(f"{path}: centroid_unit refers to units outside {TAIL}..{len(units) - 1}")
    if tm.ndim != 3 or tm.shape[0] != len(units) or tm.shape[2] != n_channels:
        raise BundleError(f"{path}: templates.npy has shape {tm.shape}, expected ({len(units)}, T, {n_channels})")
    motion_reference = None
    if f"{MOTION_REFERENCE}.npy" in files:
        try:
            motion_reference = np.load(path / f"{MOTION_REFERENCE}.npy", allow_pickle=False)
        except ValueError as exc:
            raise BundleError(f"{path / (MOTION_REFERENCE + '.npy')}: unreadable ({exc})") from None
        if motion_reference.ndim != 2:
            raise BundleError(f"{path}: {MOTION_REFERENCE}.npy has shape {motion_reference.shape}, expected 2-D")
    log.debug("bundle %s: %d units, %d centroids, %d channels", path, len(units), c.shape[0], n_channels)
    return Bundle(path, config, sampling_rate, probe, noise, c, cu, cr, tm, features, units, manifest,
                  motion_reference)
