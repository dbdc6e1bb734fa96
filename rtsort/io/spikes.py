"""The spikes file (contract): SPIKES.npz with sample_index, unit, channel, amplitude, sampling_rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import RecordingError
from ..types import SPIKE_DTYPE

REQUIRED = ("sample_index", "unit", "channel", "amplitude", "sampling_rate")


def save_spikes(path: str | Path, spikes: np.ndarray, sampling_rate: float, **extra) -> Path:
    """Write a spikes array (SPIKE_DTYPE or any array with its fields) as the spikes contract."""
    path = Path(path)
    if path.suffix != ".npz":
        raise RecordingError(f"{path}: a spikes file must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(spikes[name]) for name in spikes.dtype.names}
    arrays["sampling_rate"] = np.float64(sampling_rate)
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def as_spikes(fields, n: int) -> np.ndarray:
    """A SPIKE_DTYPE array of ``n`` spikes from ``fields`` (a mapping or a structured array) holding some of its
    fields; those missing (a file of an older rtsort) are 0, and ``confidence`` NaN (not known)."""
    names = fields.dtype.names if isinstance(fields, np.ndarray) else fields.keys()
    spikes = np.zeros(n, dtype=SPIKE_DTYPE)
    spikes["confidence"] = np.nan
    for name in SPIKE_DTYPE.names:
        if name in names:
            spikes[name] = fields[name]
    return spikes


def load_spikes(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a spikes file: (SPIKE_DTYPE array, sampling_rate); a one-line error when it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in REQUIRED if k not in f.files]
            if missing:
                raise RecordingError(f"{path}: spikes file lacks {', '.join(missing)}")
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise RecordingError(f"{path}: spikes file not found") from None
    except (ValueError, OSError) as exc:
        raise RecordingError(f"{path}: not a readable .npz spikes file ({exc})") from None
    n = data["sample_index"].shape[0]
    for name in SPIKE_DTYPE.names:
        if name in data and data[name].shape != (n,):
            raise RecordingError(f"{path}: {name} has shape {data[name].shape}, expected ({n},)")
    return as_spikes(data, n), float(data["sampling_rate"])
