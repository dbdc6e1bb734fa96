"""Spikes out to the field's formats: a SpikeInterface sorting and an NWB file.

Nothing here is imported by the runtime; SpikeInterface and pynwb are
imported inside the functions that need them, and a missing one is a
one-line :class:`RtsortError` that names the extra to install.

SpikeInterface already lists an external sorter called "rtsort" (RT-Sort, a
different project); this package never registers a sorter under that name.
A sorting made here is a plain ``NumpySorting`` whose annotations say it came
from this rtsort.
"""

from __future__ import annotations

import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import BundleError, RecordingError, RtsortError
from .spikes import load_spikes

# unit-table entries that are not metrics (the id, lists and positions are written their own way)
_NOT_METRICS = ("unit", "flags", "position_um")


def _need(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RtsortError(f"{module.split('.')[0]} is not installed: pip install 'rtsort[{extra}]'") from None


def _spikes_and_rate(spikes, sampling_rate) -> tuple[np.ndarray, float]:
    if isinstance(spikes, (str, Path)):
        arr, fs = load_spikes(spikes)
        return arr, float(sampling_rate or fs)
    if sampling_rate is None:
        raise RtsortError("sampling_rate is needed with a spikes array (a SPIKES.npz path carries its own)")
    return spikes, float(sampling_rate)


def _check(spikes: np.ndarray, fs: float, bundle) -> None:
    if bundle is None:
        return
    if abs(fs - bundle.sampling_rate) > 1e-6 * bundle.sampling_rate:
        raise BundleError(f"the spikes are at {fs:g} Hz but the bundle {bundle.path} is at {bundle.sampling_rate:g} Hz")
    if spikes.size and (spikes["channel"].max() >= bundle.n_channels or spikes["channel"].min() < 0):
        raise BundleError(f"the spikes name channels up to {int(spikes['channel'].max())} but the bundle "
                          f"{bundle.path} has {bundle.n_channels}")
    if spikes.size and spikes["unit"].max() >= bundle.n_units:
        raise BundleError(f"the spikes name unit {int(spikes['unit'].max())} but the bundle {bundle.path} has "
                          f"{bundle.n_units} units (sorted by another bundle?)")


def _unit_ids(spikes: np.ndarray, bundle) -> np.ndarray:
    ids = np.unique(spikes["unit"][spikes["unit"] >= 0]).astype(np.int64)
    if bundle is not None:
        ids = np.union1d(ids, np.arange(bundle.n_units))
    return ids


def unit_columns(bundle, unit_ids) -> dict:
    """Per-unit columns from the bundle's unit table: ``{name: (values, description)}``.

    Every numeric entry (quality metrics, ``n_spikes``, ``peak_channel``, ...)
    is a float column (NaN where missing), ``flags`` a comma-separated text
    column, ``position_um`` two columns, other text entries (``phy_group``)
    text columns.
    """
    if bundle is None:
        return {}
    rows = {int(u["unit"]): u for u in bundle.units}
    keys = []
    for u in bundle.units:
        keys += [k for k in u if k not in _NOT_METRICS and k not in keys]
    out = {}
    for k in keys:
        vals = [rows.get(int(i), {}).get(k) for i in unit_ids]
        if all(v is None or isinstance(v, str) for v in vals):
            out[k] = (np.array(["" if v is None else v for v in vals]), f"unit table: {k}")
        elif all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in vals):
            out[k] = (np.array([np.nan if v is None else float(v) for v in vals]), f"unit table: {k}")
    out["flags"] = (np.array([",".join(rows.get(int(i), {}).get("flags") or []) for i in unit_ids]),
                    "quality flags of the unit table (empty: none)")
    pos = np.array([rows.get(int(i), {}).get("position_um") or [np.nan, np.nan] for i in unit_ids], dtype=float)
    out["position_x_um"] = (pos[:, 0], "median spike position on the probe, x (um)")
    out["position_y_um"] = (pos[:, 1], "median spike position on the probe, y (um)")
    return out


def to_spikeinterface(spikes, sampling_rate: float | None = None, bundle=None):
    """rtsort spikes as a SpikeInterface sorting (``NumpySorting``, one segment).

    Parameters
    ----------
    spikes : structured ndarray (SPIKE_DTYPE fields), or the path of a SPIKES.npz
    sampling_rate : float
        Hz; needed with an array, read from the file with a path.
    bundle : Bundle or path, optional
        Adds every unit of the bundle (also those without spikes) and the unit
        table as unit properties (quality metrics, ``peak_channel``, ``flags``).

    Unassigned spikes (unit -1) are left out. SpikeInterface is imported here,
    not with rtsort (``pip install 'rtsort[interop]'``).
    """
    sic = _need("spikeinterface.core", "interop")
    from ..bundle import Bundle, load_bundle

    spikes, fs = _spikes_and_rate(spikes, sampling_rate)
    if bundle is not None and not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    _check(spikes, fs, bundle)
    keep = spikes["unit"] >= 0
    ids = _unit_ids(spikes, bundle)
    sorting = sic.NumpySorting.from_samples_and_labels([spikes["sample_index"][keep].astype(np.int64)],
                                                      [spikes["unit"][keep].astype(np.int64)], fs, unit_ids=ids)
    for name, (values, _) in unit_columns(bundle, ids).items():
        sorting.set_property(name, values)
    sorting.annotate(sorter="rtsort (real-time streaming spike sorter; not SpikeInterface's 'rtsort' RT-Sort)")
    return sorting


def write_spikeinterface(spikes, sampling_rate: float, bundle, out_dir: str | Path) -> Path:
    """Save :func:`to_spikeinterface`'s sorting as a SpikeInterface folder (``spikeinterface.load`` reads it)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise RecordingError(f"{out}: folder exists and is not empty")
    if out.exists():
        out.rmdir()
    sorting = to_spikeinterface(spikes, sampling_rate, bundle)
    with warnings.catch_warnings():  # an in-memory sorting has no provenance to save: nothing to warn about
        warnings.filterwarnings("ignore", message="The extractor is not serializable")
        sorting.save(folder=out)
    return out


def write_nwb(spikes, sampling_rate: float, bundle, out_path: str | Path, session_description: str | None = None,
              session_start_time: datetime | None = None, identifier: str | None = None) -> Path:
    """Write an NWB file: the probe's electrodes and a units table (``pynwb.NWBHDF5IO(path, "r")`` reads it).

    Electrodes: one per channel, ``rel_x`` / ``rel_y`` the contact position in
    um, ``channel_name`` the channel id. Units: one row per bundle unit (id =
    rtsort unit), ``spike_times`` in seconds from the recording's first
    sample, ``electrodes`` the peak electrode, ``waveform_mean`` the unit's
    template on every electrode (samples x electrodes, volts, at the
    recording's rate, trough ``waveform_time_before_peak_in_ms`` after its
    start), ``spike_amplitudes_uV`` each spike's trough, and the unit table's
    quality metrics as columns. Unassigned spikes (-1) are not units: their
    count is in the file's notes.
    """
    pynwb = _need("pynwb", "export")
    from pynwb.misc import Units

    from ..bundle import Bundle, load_bundle

    spikes, fs = _spikes_and_rate(spikes, sampling_rate)
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    _check(spikes, fs, bundle)
    out = Path(out_path)
    if out.suffix != ".nwb":
        raise RecordingError(f"{out}: an NWB file must end in .nwb")
    out.parent.mkdir(parents=True, exist_ok=True)
    ids = _unit_ids(spikes, bundle)
    n_unassigned = int(np.count_nonzero(spikes["unit"] < 0))
    from .. import __version__

    nwb = pynwb.NWBFile(
        session_description=session_description or f"spikes sorted by rtsort {__version__} with bundle "
                                                    f"{Path(bundle.path).name}",
        identifier=identifier or str(uuid.uuid4()),
        session_start_time=session_start_time or datetime.now(timezone.utc),
        notes=f"{spikes.size} spikes; {n_unassigned} unassigned (unit -1) are not in the units table. Bundle: "
              f"{Path(bundle.path).resolve()}")
    device = nwb.create_device(name="probe", description="the probe of the rtsort bundle")
    group = nwb.create_electrode_group(name="probe", description="all channels of the bundle", location="unknown",
                                       device=device)
    nwb.add_electrode_column(name="channel_name", description="channel id in the recording")
    for i, (x, y) in enumerate(bundle.probe.positions_um):
        nwb.add_electrode(id=i, group=group, location="unknown", rel_x=float(x), rel_y=float(y),
                          channel_name=str(bundle.probe.channel_ids[i]))
    nbefore = int(round(bundle.config.snippets.ms_before * fs / 1000.0))
    nwb.units = Units(name="units", description="units sorted by rtsort", waveform_rate=fs, waveform_unit="volts",
                      waveform_time_before_peak_in_ms=1000.0 * nbefore / fs, electrode_table=nwb.electrodes)
    columns = unit_columns(bundle, ids)
    columns.pop("peak_channel", None)
    nwb.add_unit_column(name="peak_channel", description="channel of the largest template trough (electrodes row)")
    nwb.add_unit_column(name="spike_amplitudes_uV", description="trough amplitude of each spike (uV)", index=True)
    for name, (_, description) in columns.items():
        nwb.add_unit_column(name=name, description=description)
    order = np.argsort(spikes["sample_index"], kind="stable")
    s = spikes[order]
    rows = {int(u["unit"]): u for u in bundle.units}
    for k, unit in enumerate(ids):
        mine = s["unit"] == unit
        t = bundle.templates[unit] if unit < bundle.n_units else np.zeros(bundle.templates.shape[1:], np.float32)
        peak = rows.get(int(unit), {}).get("peak_channel")
        if peak is None or not 0 <= peak < bundle.n_channels:
            peak = int(np.abs(t).max(axis=0).argmax())
        values = {name: v[k].item() if isinstance(v[k], np.generic) else v[k] for name, (v, _) in columns.items()}
        nwb.add_unit(id=int(unit), spike_times=s["sample_index"][mine] / fs, electrodes=[int(peak)],
                     waveform_mean=(np.asarray(t, np.float64) * 1e-6), peak_channel=int(peak),
                     spike_amplitudes_uV=s["amplitude"][mine].astype(np.float64), **values)
    with pynwb.NWBHDF5IO(str(out), "w") as io:
        io.write(nwb)
    return out


def export_spikes(spikes_path: str | Path, bundle_path: str | Path, to: str, out: str | Path) -> dict:
    """``rtsort export``: SPIKES.npz and its bundle to ``to`` ("nwb" or "spikeinterface") at ``out``."""
    from ..bundle import load_bundle

    if to not in ("nwb", "spikeinterface"):
        raise RtsortError(f"unknown export format {to!r}; use nwb or spikeinterface")
    spikes, fs = load_spikes(spikes_path)
    bundle = load_bundle(bundle_path)
    if to == "nwb":
        write_nwb(spikes, fs, bundle, out)
    else:
        write_spikeinterface(spikes, fs, bundle, out)
    n_units = int(_unit_ids(spikes, bundle).size)
    return {"spikes": int(spikes.size), "assigned": int(np.count_nonzero(spikes["unit"] >= 0)), "units": n_units,
            "out": str(out)}
