"""``rtsort report``: what a bundle learned and what a sorting found, as plots and one HTML page.

From a bundle: every unit's mean waveform on its biggest channels, the units'
positions on the probe, the centroids in a 2-D projection of feature space
(the space the runtime labels in) and the quality table with its flags.
From a spikes file: inter-spike-interval histograms with the refractory
violations, firing rate over time, and amplitudes over time (drift and
amplitude loss show there). Nothing here runs in the live path.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np

from .errors import RecordingError

log = logging.getLogger("rtsort.report")

REFRACTORY_MS = 1.5
METRIC_COLUMNS = ("n_spikes", "firing_rate_hz", "snr", "isi_violations_ratio", "presence_ratio",
                  "amplitude_cutoff", "isolation_distance", "l_ratio", "silhouette")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def _grid(n: int, cols: int = 8):
    cols = max(1, min(cols, n))
    return cols, int(np.ceil(n / cols))


def _colour(u: int):
    return pyplot().get_cmap("tab20")(u % 20)


def plot_waveforms(bundle, path: Path, n_channels: int = 4) -> None:
    """Each unit's mean waveform (uV) on its ``n_channels`` biggest channels, stacked by depth."""
    plt = pyplot()
    tm = bundle.templates  # (U, T, C)
    n = tm.shape[0]
    cols, rows = _grid(n)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.2 * rows), squeeze=False)
    t_ms = (np.arange(tm.shape[1]) - bundle.features.get("n_before", 0)) / bundle.sampling_rate * 1000.0
    pos = bundle.probe.positions_um
    for u, ax in enumerate(axes.flat):
        ax.axis("off")
        if u >= n:
            continue
        ptp = np.ptp(tm[u], axis=0)
        top = np.argsort(ptp)[::-1][:n_channels]
        top = top[np.argsort(pos[top, 1])]
        step = max(float(ptp[top].max()), 1e-6)
        for i, c in enumerate(top):
            ax.plot(t_ms, tm[u][:, c] + i * step, color=_colour(u), lw=1)
            ax.text(t_ms[-1], i * step, f"{c}", fontsize=6, va="center")
        row = bundle.units[u]
        ax.set_title(f"unit {u}: {row['n_spikes']} sp, SNR {row['snr']:.1f}" +
                     (" *" if row.get("flags") else ""), fontsize=7)
    fig.suptitle(f"mean waveforms ({n_channels} biggest channels, uV, ms from the trough; * = flagged)", fontsize=9)
    save_figure(fig, path)


def plot_probe(bundle, path: Path) -> None:
    plt = pyplot()
    pos = bundle.probe.positions_um
    fig, ax = plt.subplots(figsize=(4, max(4, min(14, np.ptp(pos[:, 1]) / 60 + 2))))
    ax.scatter(pos[:, 0], pos[:, 1], s=8, color="0.75", marker="s", label="channels")
    for row in bundle.units:
        x, y = row["position_um"]
        if np.isfinite(x):
            ax.scatter([x], [y], s=30 + 4 * min(row["snr"], 30), color=_colour(row["unit"]),
                       edgecolor="k" if row.get("flags") else "none")
            ax.annotate(str(row["unit"]), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("x (um)")
    ax.set_ylabel("y (um)")
    ax.set_title("unit positions (size ~ SNR, black edge = flagged)", fontsize=8)
    save_figure(fig, path)


def plot_feature_space(bundle, path: Path) -> None:
    """Centroids (one per group; a unit may own several) in the first two principal axes of feature space."""
    plt = pyplot()
    c = bundle.centroids.astype(np.float64)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    if c.shape[0] >= 2:
        centred = c - c.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        share = s[:2] ** 2 / max((s ** 2).sum(), 1e-12)
        for i, (x, y) in enumerate(xy):
            u = int(bundle.centroid_unit[i])
            ax.scatter([x], [y], color=_colour(u), s=30)
            ax.annotate(str(u), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"axis 1 ({100 * share[0]:.0f} % of the spread)")
        ax.set_ylabel(f"axis 2 ({100 * share[1]:.0f} %)")
    ax.set_title("centroids in feature space (label = unit)", fontsize=8)
    save_figure(fig, path)


def spike_summary(spikes: np.ndarray, sampling_rate: float) -> list:
    """Per unit (unit >= 0): count, rate, refractory violations, median amplitude."""
    t = spikes["sample_index"] / sampling_rate
    duration = float(t.max() - t.min()) if t.size > 1 else 0.0
    rows = []
    for u in np.unique(spikes["unit"][spikes["unit"] >= 0]):
        m = spikes["unit"] == u
        isi = np.diff(np.sort(t[m])) * 1000.0
        rows.append({"unit": int(u), "n_spikes": int(m.sum()),
                     "firing_rate_hz": float(m.sum() / duration) if duration > 0 else 0.0,
                     "refractory_violations": int(np.sum(isi < REFRACTORY_MS)),
                     "refractory_violation_pct": float(100.0 * np.mean(isi < REFRACTORY_MS)) if isi.size else 0.0,
                     "median_amplitude_uV": float(np.median(spikes["amplitude"][m]))})
    return rows


def plot_isi(spikes: np.ndarray, sampling_rate: float, path: Path, max_ms: float = 50.0) -> None:
    plt = pyplot()
    units = np.unique(spikes["unit"][spikes["unit"] >= 0])
    cols, rows = _grid(max(len(units), 1))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, u in zip(axes.flat, units):
        ax.axis("on")
        t = np.sort(spikes["sample_index"][spikes["unit"] == u]) / sampling_rate
        isi = np.diff(t) * 1000.0
        ax.hist(isi[isi < max_ms], bins=np.arange(0, max_ms + 1, 1.0), color=_colour(int(u)))
        ax.axvline(REFRACTORY_MS, color="r", lw=0.8)
        pct = 100.0 * np.mean(isi < REFRACTORY_MS) if isi.size else 0.0
        ax.set_title(f"unit {u}: {pct:.2f} % < {REFRACTORY_MS:g} ms", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("inter-spike intervals (ms; red: refractory period)", fontsize=9)
    save_figure(fig, path)


def plot_activity(spikes: np.ndarray, sampling_rate: float, path: Path, bin_s: float = 1.0) -> None:
    """Firing rate over time (one row per unit) and every spike's amplitude over time."""
    plt = pyplot()
    t = spikes["sample_index"] / sampling_rate
    units = np.unique(spikes["unit"][spikes["unit"] >= 0])
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 3 + 0.12 * len(units) + 3), sharex=True)
    if t.size:
        edges = np.arange(t.min(), t.max() + bin_s, bin_s)
        rate = np.stack([np.histogram(t[spikes["unit"] == u], edges)[0] / bin_s for u in units]) \
            if len(units) else np.zeros((1, max(edges.size - 1, 1)))
        im = a1.imshow(rate, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                       extent=(edges[0], edges[-1], -0.5, rate.shape[0] - 0.5))
        fig.colorbar(im, ax=a1, label="Hz")
        a1.set_yticks(range(len(units)), [str(u) for u in units], fontsize=6)
        m = spikes["unit"] >= 0
        a2.scatter(t[m], spikes["amplitude"][m], s=1, c=[_colour(int(u)) for u in spikes["unit"][m]],
                   rasterized=True)
        a2.scatter(t[~m], spikes["amplitude"][~m], s=1, color="0.6", rasterized=True, label="unassigned")
    a1.set_ylabel("unit")
    a1.set_title(f"firing rate ({bin_s:g} s bins)", fontsize=8)
    a2.set_ylabel("trough amplitude (uV)")
    a2.set_xlabel("time (s)")
    a2.set_title("amplitude over time (grey: unassigned)", fontsize=8)
    save_figure(fig, path)


def _table(rows: list, columns) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list):
            return ", ".join(map(str, v))
        return str(v)

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(target: str | Path, out_dir: str | Path, bundle: str | Path | None = None) -> Path:
    """Plots and ``index.html`` for a bundle directory or a spikes file (with ``bundle``, both)."""
    from .bundle import load_bundle
    from .io.spikes import load_spikes

    target = Path(target)
    out = Path(out_dir)
    if target.is_dir():
        b, spikes, fs = load_bundle(target), None, None
    elif target.suffix == ".npz":
        spikes, fs = load_spikes(target)
        b = load_bundle(bundle) if bundle is not None else None
    else:
        raise RecordingError(f"{target}: neither a bundle directory nor a SPIKES.npz file")
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>rtsort report: {html.escape(str(target))}</h1>"]
    if b is not None:
        plot_waveforms(b, out / "waveforms.png")
        plot_probe(b, out / "probe.png")
        plot_feature_space(b, out / "feature_space.png")
        parts += [f"<h2>Bundle {html.escape(str(b.path))}: {b.n_units} units, {b.n_channels} channels, "
                  f"{b.sampling_rate:g} Hz</h2>",
                  _table(b.units, ("unit", "peak_channel") + METRIC_COLUMNS + ("flags",)),
                  '<img src="waveforms.png"><br><img src="probe.png"> <img src="feature_space.png">']
    if spikes is not None:
        plot_isi(spikes, fs, out / "isi.png")
        plot_activity(spikes, fs, out / "activity.png")
        n_un = int(np.sum(spikes["unit"] < 0))
        parts += [f"<h2>Spikes: {spikes.size} ({n_un} unassigned), {fs:g} Hz</h2>",
                  _table(spike_summary(spikes, fs), ("unit", "n_spikes", "firing_rate_hz", "refractory_violations",
                                                     "refractory_violation_pct", "median_amplitude_uV")),
                  '<img src="isi.png"><br><img src="activity.png">']
    style = "<style>body{font-family:sans-serif} table{border-collapse:collapse;font-size:12px} " \
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} img{max-width:100%}</style>"
    index = out / "index.html"
    index.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>rtsort report</title>{style}"
                     f"</head><body>{''.join(parts)}</body></html>\n")
    log.info("report written to %s", index)
    return index
