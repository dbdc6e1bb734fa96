"""Phy (template-gui) folders: export a sorting for manual curation, read the curation back.

The export is what Phy's template GUI opens (``phy template-gui DIR/params.py``):
``spike_times``, ``spike_templates`` / ``spike_clusters`` (the rtsort unit),
``amplitudes`` (trough depth in uV), ``templates`` (the bundle's mean waveforms,
uV), the channel map and positions, identity whitening, ``similar_templates``,
``cluster_group.tsv`` (unflagged units "good", flagged "mua", unassigned
spikes as one extra "noise" cluster) and one ``cluster_<metric>.tsv`` per
quality metric. ``params.py`` points at the raw recording, which Phy reads
for waveforms. ``rtsort_export.json`` ties the folder to its bundle.

Reading back takes only ``.npy`` (no pickle) and ``.tsv`` files; rtsort
writes ``params.py`` for Phy but never executes it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..bundle import manifest_digest
from ..errors import RecordingError

EXPORT_INFO = "rtsort_export.json"
TSV_METRICS = ("snr", "firing_rate_hz", "isi_violations_ratio", "presence_ratio", "amplitude_cutoff",
               "isolation_distance")


def _write_tsv(path: Path, header: tuple, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def export_phy(spikes: np.ndarray, sampling_rate: float, bundle, recording, out_dir: str | Path) -> Path:
    """Write a Phy folder for ``spikes`` (SPIKE_DTYPE, sorted by ``bundle`` from ``recording``)."""
    out = Path(out_dir)
    source = Path(str(recording.source))
    meta = source.with_suffix(".json")
    if source.suffix != ".bin" or not meta.exists():
        raise RecordingError(f"{source}: Phy reads raw binary recordings (.bin + .json sidecar); write one with "
                             "rtsort's recording format first")
    dtype = json.loads(meta.read_text())["dtype"]
    out.mkdir(parents=True, exist_ok=True)
    n_units = bundle.n_units
    unassigned = n_units  # one extra cluster for the spikes no unit claimed
    cluster = np.where(spikes["unit"] >= 0, spikes["unit"], unassigned).astype(np.int32)
    templates = np.concatenate([bundle.templates, np.zeros((1,) + bundle.templates.shape[1:], np.float32)])
    flat = templates.reshape(templates.shape[0], -1).astype(np.float64)
    norm = np.maximum(np.linalg.norm(flat, axis=1), 1e-12)
    similar = (flat @ flat.T) / norm[:, None] / norm[None, :]
    c = bundle.n_channels
    arrays = {
        "spike_times": spikes["sample_index"].astype(np.uint64),
        "spike_templates": cluster,
        "spike_clusters": cluster,
        "amplitudes": np.abs(spikes["amplitude"]).astype(np.float32),
        "templates": templates.astype(np.float32),
        "channel_map": np.arange(c, dtype=np.int32),
        "channel_positions": np.asarray(bundle.probe.positions_um, dtype=np.float64),
        "similar_templates": similar.astype(np.float32),
        "whitening_mat": np.eye(c),
        "whitening_mat_inv": np.eye(c),
    }
    for name, a in arrays.items():
        np.save(out / f"{name}.npy", a, allow_pickle=False)
    (out / "params.py").write_text(
        f"dat_path = {str(source.resolve())!r}\nn_channels_dat = {c}\ndtype = {dtype!r}\noffset = 0\n"
        f"sample_rate = {float(sampling_rate)!r}\nhp_filtered = False\n")
    groups = [(u["unit"], "mua" if u.get("flags") else "good") for u in bundle.units] + [(unassigned, "noise")]
    _write_tsv(out / "cluster_group.tsv", ("cluster_id", "group"), groups)
    for m in TSV_METRICS:
        _write_tsv(out / f"cluster_{m}.tsv", ("cluster_id", m),
                   [(u["unit"], "" if u.get(m) is None else f"{u[m]:.4g}") for u in bundle.units])
    (out / EXPORT_INFO).write_text(json.dumps({
        "bundle": str(Path(bundle.path).resolve()), "bundle_manifest_sha256": manifest_digest(bundle.path),
        "recording": str(source.resolve()), "n_spikes": int(spikes.size), "n_units": int(n_units),
        "unassigned_cluster": int(unassigned)}, indent=1) + "\n")
    return out


def read_curation(phy_dir: str | Path) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """(spike_times, spike_clusters, {cluster: group}, export info) of a curated Phy folder."""
    d = Path(phy_dir)
    try:
        info = json.loads((d / EXPORT_INFO).read_text())
        times = np.load(d / "spike_times.npy", allow_pickle=False).astype(np.int64).ravel()
        clusters = np.load(d / "spike_clusters.npy", allow_pickle=False).astype(np.int64).ravel()
    except FileNotFoundError as exc:
        raise RecordingError(f"{d}: not a Phy folder exported by rtsort ({Path(exc.filename).name} missing)") \
            from None
    except (ValueError, OSError) as exc:
        raise RecordingError(f"{d}: unreadable Phy folder ({exc})") from None
    if times.shape != clusters.shape:
        raise RecordingError(f"{d}: {times.size} spike times but {clusters.size} spike clusters")
    groups = {}
    path = d / "cluster_group.tsv"
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                try:
                    groups[int(row["cluster_id"])] = (row.get("group") or "unsorted").strip()
                except (KeyError, ValueError):
                    raise RecordingError(f"{path}: expected columns cluster_id and group, got {row}") from None
    return times, clusters, groups, info
