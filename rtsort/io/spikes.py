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
    spikes = np.zeros(n, dtype=SPIKE_DTYPE)
    spikes["confidence"] = np.nan  # a file written without confidences
    for name in SPIKE_DTYPE.names:
        if name in data:
            if data[name].shape != (n,):
                raise RecordingError(f"{path}: {name} has shape {data[name].shape}, expected ({n},)")
            spikes[name] = data[name]
    return spikes, float(data["sampling_rate"])
