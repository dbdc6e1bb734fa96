#!/usr/bin/env python
"""The development corpus: 16 ground-truth recordings with a fixed tune / report split.

Tune on the ``tune`` half, publish numbers on the ``report`` half, so that
accuracy is shown on recordings no choice was made on. Every recording is generated with SpikeInterface's
building blocks (``generate_sorting``, ``generate_unit_locations``,
``generate_templates``, ``generate_drifting_recording`` with a displacement
we compute here) and written exactly as ``rtsort simulate`` writes its output
(:func:`rtsort.sim.write_ground_truth`): ``recording.bin`` + ``recording.json``,
``truth.npz`` and ``simulation.json``, plus

* ``motion.npz``: the true probe displacement, for scoring motion tracking
  (written for every recording; all zeros for the static ones):
    - ``times_s`` (n_bins,): bin centres; bin ``i`` covers ``[i, i + 1) / fs``,
      ``fs`` = ``sampling_rate_hz`` (5 Hz)
    - ``depths_um`` (n_depth_bins,): depths (probe y) from the lowest to the
      highest contact, at most 50 um apart
    - ``displacement_um`` (n_bins, n_depth_bins): how far (um, along y) a unit
      at that depth appears moved at that time, relative to its position in
      ``truth.npz``'s ``unit_locations_um`` (where ``templates`` were made).
      **Positive = the units appear at higher y on the probe** (towards the
      contacts with larger y); a probe pushed into the tissue gives the
      opposite sign. The injected templates were computed on a 1 um grid of
      displacements, so what was applied is this value rounded to the nearest
      micrometre.
    - ``unit_displacement_um`` (n_bins, n_units): the same per true unit.
* ``corpus.json``: the done-marker (the spec and its hash), written last.

truth.npz also holds ``unit_snr`` (each unit's template peak over the noise
level: the peak absolute amplitude of the raw, zero-displacement template on its
best channel, divided by ``noise_uV``; the band-passed SNR a detector sees is
lower) and ``unit_firing_rate_hz`` (the target rate).

Usage::

    python tools/corpus.py [--split tune|report|all] [--out DIR] [--only ID ...] [--quick]
    python tools/corpus.py --list

DIR defaults to $RTSORT_CORPUS or ~/.cache/rtsort/corpus. Complete recordings
(marker present with the same hash) are skipped. ``--quick`` writes the same
recordings with durations scaled by 0.02 (a few seconds each; tests use it).

Other tools use ``RECORDINGS``, ``TUNE``, ``REPORT``, ``SPECS``,
``recording_dir(id, root)`` and ``ensure(ids, root)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SAMPLING_RATE = 30000.0
MOTION_FS = 5.0            # displacement bins per second
GRID_UM = 1.0              # templates are precomputed every GRID_UM of displacement
DEPTH_BIN_UM = 50.0        # at most this far apart in motion.npz's depths_um
GENERATOR_VERSION = 1      # bump when the generation changes what is written (invalidates the cache)

KINDS = ("static", "zigzag", "steps", "ramp", "nonrigid")
PROBES = {  # name -> channels
    "tetrode": 4,
    "mc32": 32,
    "mc64": 64,
    "np128": 128,
    "np384": 384,
}
# unit placement (SpikeInterface's generate_unit_locations)
LAYOUTS = {
    "crowded": dict(margin_um=10.0, minimum_z=5.0, maximum_z=30.0, minimum_distance=8.0),
    "normal": dict(margin_um=20.0, minimum_z=5.0, maximum_z=40.0, minimum_distance=18.0),
    "sparse": dict(margin_um=25.0, minimum_z=5.0, maximum_z=50.0, minimum_distance=35.0),
}


@dataclass(frozen=True)
class Spec:
    """One corpus recording.

    ``snr`` and ``firing_hz`` are (low, high): the units' values are spread
    evenly on a log scale over that range (both ends included), shuffled.
    ``drift`` parameters depend on ``kind``:

    * static: none
    * zigzag: ``amplitude_um`` (half the peak-to-peak), ``period_s``
    * steps: ``steps``: ((fraction of the duration, displacement from then on), ...)
    * ramp: ``start_um``, ``stop_um`` (linear over the whole recording)
    * nonrigid: ``shape`` ("zigzag" with ``amplitude_um``, ``period_s``, or
      "random_walk" with ``amplitude_um``, the largest excursion, and
      ``smooth_s``), scaled by depth: ``factor_bottom`` at the lowest contact,
      ``factor_top`` at the highest, linear between (clipped outside)
    """

    id: str
    probe: str
    n_units: int
    noise_uV: float
    snr: tuple
    firing_hz: tuple
    layout: str
    kind: str
    duration_s: float
    seed: int
    drift: dict = field(default_factory=dict)

    @property
    def n_channels(self) -> int:
        return PROBES[self.probe]

    @property
    def split(self) -> str:
        return "tune" if self.id in TUNE else "report" if self.id in REPORT else "none"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["snr"], d["firing_hz"] = list(self.snr), list(self.firing_hz)
        d["drift"] = json.loads(json.dumps(self.drift))
        return d

    def digest(self, duration_scale: float = 1.0) -> str:
        blob = json.dumps({"spec": self.to_dict(), "scale": float(duration_scale), "version": GENERATOR_VERSION,
                           "fs": SAMPLING_RATE, "motion_fs": MOTION_FS, "grid_um": GRID_UM}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Seeds 1001-1016: distinct from every default seed in rtsort (sim.py's 0, compare.py's 1-3, the CLI's 0).
RECORDINGS = [
    # ------------------------------------------------------------------ tune
    Spec("t01-tetrode-static", "tetrode", 8, 6.0, (3.0, 30.0), (0.5, 20.0), "crowded", "static", 180.0, 1001),
    Spec("t02-32ch-zigzag", "mc32", 24, 10.0, (2.5, 25.0), (1.0, 15.0), "normal", "zigzag", 180.0, 1002,
         dict(amplitude_um=12.0, period_s=60.0)),
    Spec("t03-32ch-static-crowded", "mc32", 48, 12.0, (2.5, 20.0), (0.5, 10.0), "crowded", "static", 180.0, 1003),
    Spec("t04-64ch-steps", "mc64", 40, 8.0, (3.0, 40.0), (0.5, 30.0), "normal", "steps", 180.0, 1004,
         dict(steps=((1 / 3, 15.0), (2 / 3, -10.0)))),
    Spec("t05-128ch-nonrigid", "np128", 60, 7.0, (2.5, 30.0), (0.5, 20.0), "normal", "nonrigid", 180.0, 1005,
         dict(shape="zigzag", amplitude_um=15.0, period_s=80.0, factor_bottom=0.25, factor_top=1.0)),
    Spec("t06-384ch-ramp", "np384", 120, 8.0, (2.5, 50.0), (0.5, 30.0), "sparse", "ramp", 180.0, 1006,
         dict(start_um=0.0, stop_um=30.0)),
    Spec("t07-tetrode-steps-long", "tetrode", 10, 5.0, (2.5, 20.0), (0.5, 30.0), "crowded", "steps", 600.0, 1007,
         dict(steps=((0.25, 10.0), (0.5, 0.0), (0.75, -10.0)))),
    Spec("t08-32ch-nonrigid-long", "mc32", 20, 9.0, (2.5, 30.0), (0.5, 20.0), "sparse", "nonrigid", 300.0, 1008,
         dict(shape="random_walk", amplitude_um=20.0, smooth_s=10.0, factor_bottom=1.0, factor_top=0.3)),
    # ---------------------------------------------------------------- report
    Spec("r01-tetrode-ramp", "tetrode", 10, 8.0, (2.5, 25.0), (0.5, 20.0), "crowded", "ramp", 180.0, 1009,
         dict(start_um=0.0, stop_um=15.0)),
    Spec("r02-32ch-steps", "mc32", 24, 9.0, (2.5, 30.0), (0.5, 20.0), "normal", "steps", 180.0, 1010,
         dict(steps=((0.3, 20.0), (0.6, -10.0)))),
    Spec("r03-32ch-static-sparse", "mc32", 12, 11.0, (2.5, 15.0), (0.5, 10.0), "sparse", "static", 180.0, 1011),
    Spec("r04-64ch-nonrigid", "mc64", 50, 8.0, (2.5, 35.0), (0.5, 20.0), "crowded", "nonrigid", 180.0, 1012,
         dict(shape="random_walk", amplitude_um=15.0, smooth_s=8.0, factor_bottom=0.3, factor_top=1.0)),
    Spec("r05-128ch-static", "np128", 80, 10.0, (2.5, 40.0), (0.5, 30.0), "crowded", "static", 180.0, 1013),
    Spec("r06-384ch-zigzag", "np384", 100, 7.0, (2.5, 50.0), (0.5, 20.0), "normal", "zigzag", 180.0, 1014,
         dict(amplitude_um=10.0, period_s=60.0)),
    Spec("r07-tetrode-zigzag-long", "tetrode", 8, 6.0, (3.0, 30.0), (0.5, 30.0), "normal", "zigzag", 600.0, 1015,
         dict(amplitude_um=8.0, period_s=120.0)),
    Spec("r08-32ch-ramp-long", "mc32", 20, 10.0, (2.5, 30.0), (0.5, 20.0), "normal", "ramp", 300.0, 1016,
         dict(start_um=0.0, stop_um=-25.0)),
]

# The split, fixed (never random): tune on TUNE, publish REPORT.
TUNE = ("t01-tetrode-static", "t02-32ch-zigzag", "t03-32ch-static-crowded", "t04-64ch-steps",
        "t05-128ch-nonrigid", "t06-384ch-ramp", "t07-tetrode-steps-long", "t08-32ch-nonrigid-long")
REPORT = ("r01-tetrode-ramp", "r02-32ch-steps", "r03-32ch-static-sparse", "r04-64ch-nonrigid",
          "r05-128ch-static", "r06-384ch-zigzag", "r07-tetrode-zigzag-long", "r08-32ch-ramp-long")
SPECS = {s.id: s for s in RECORDINGS}


def default_root() -> Path:
    env = os.environ.get("RTSORT_CORPUS")
    return Path(env) if env else Path.home() / ".cache" / "rtsort" / "corpus"


def recording_dir(rec_id: str, root=None) -> Path:
    """The folder of corpus recording ``rec_id`` (whether generated or not)."""
    if rec_id not in SPECS:
        raise KeyError(f"unknown corpus recording {rec_id!r}")
    return (Path(root) if root is not None else default_root()) / rec_id


def ids_of(split: str) -> tuple:
    return {"tune": TUNE, "report": REPORT, "all": TUNE + REPORT}[split]


# ------------------------------------------------------------------ probes and motion
def build_probe(name: str):
    """The probe of a spec: a tetrode, 32- / 64-channel multi-column probes, or Neuropixels 1.0-like shanks."""
    from probeinterface import generate_multi_columns_probe, generate_tetrode

    if name == "tetrode":
        probe = generate_tetrode(r=12.5)
    elif name == "mc32":  # three staggered columns, 25 um pitch
        probe = generate_multi_columns_probe(num_columns=3, num_contact_per_column=[10, 12, 10], xpitch=25,
                                             ypitch=25, y_shift_per_column=[0, -12.5, 0], contact_shapes="circle",
                                             contact_shape_params={"radius": 6})
    elif name == "mc64":  # four staggered columns
        probe = generate_multi_columns_probe(num_columns=4, num_contact_per_column=16, xpitch=20, ypitch=25,
                                             y_shift_per_column=[0, 12.5, 0, 12.5], contact_shapes="circle",
                                             contact_shape_params={"radius": 6})
    elif name in ("np128", "np384"):  # Neuropixels 1.0 checkerboard: 16 um columns, 20 um rows
        per_col = PROBES[name] // 4
        probe = generate_multi_columns_probe(num_columns=4, num_contact_per_column=per_col, xpitch=16, ypitch=40,
                                             y_shift_per_column=[0, 20, 0, 20], contact_shapes="square",
                                             contact_shape_params={"width": 12})
    else:
        raise ValueError(f"unknown probe {name!r}")
    probe.set_device_channel_indices(np.arange(probe.get_contact_count()))
    return probe


def depth_factor(spec: Spec, y_um, y_range) -> np.ndarray:
    """Non-rigid scale of the displacement at depth ``y_um`` (1 everywhere for rigid kinds)."""
    y_um = np.asarray(y_um, dtype=np.float64)
    if spec.kind != "nonrigid":
        return np.ones_like(y_um)
    lo, hi = y_range
    frac = np.clip((y_um - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    fb, ft = spec.drift["factor_bottom"], spec.drift["factor_top"]
    return fb + (ft - fb) * frac


def displacement_trace(spec: Spec, times_s: np.ndarray, duration_s: float, time_scale: float = 1.0) -> np.ndarray:
    """The rigid displacement shape (um) at ``times_s``; ``time_scale`` shrinks periods with the duration."""
    d, t = spec.drift, np.asarray(times_s, dtype=np.float64)
    kind = spec.kind
    shape = d.get("shape", kind) if kind == "nonrigid" else kind
    if kind == "static":
        return np.zeros_like(t)
    if shape == "zigzag":  # triangle wave starting at 0, going up first: 0 -> +A -> -A -> 0 per period
        phase = (t / (d["period_s"] * time_scale)) % 1.0
        tri = np.where(phase < 0.25, 4 * phase, np.where(phase < 0.75, 2 - 4 * phase, 4 * phase - 4))
        return d["amplitude_um"] * tri
    if shape == "steps":
        out = np.zeros_like(t)
        for frac, value in d["steps"]:
            out[t >= frac * duration_s] = value
        return out
    if shape == "ramp":
        return d["start_um"] + (d["stop_um"] - d["start_um"]) * np.clip(t / duration_s, 0.0, 1.0)
    if shape == "random_walk":  # a smoothed Gaussian random walk, scaled so its largest excursion is amplitude_um
        rng = np.random.default_rng(spec.seed + 7)
        walk = np.cumsum(rng.standard_normal(t.size))
        width = max(1, int(round(d["smooth_s"] * time_scale * MOTION_FS)))
        kernel = np.hanning(2 * width + 1)
        kernel /= kernel.sum()
        padded = np.pad(walk, width, mode="edge")
        smooth = np.convolve(padded, kernel, mode="valid")
        smooth -= smooth[0]
        peak = np.abs(smooth).max()
        return smooth * (d["amplitude_um"] / peak) if peak > 0 else smooth
    raise ValueError(f"unknown drift shape {shape!r}")


def _spread(lo: float, hi: float, n: int, rng) -> np.ndarray:
    """n values evenly spaced on a log scale over [lo, hi], in random order."""
    vals = np.exp(np.linspace(np.log(lo), np.log(hi), n)) if n > 1 else np.array([np.sqrt(lo * hi)])
    return vals[rng.permutation(n)]


# ------------------------------------------------------------------ generation
def generate(spec: Spec, out_dir, duration_scale: float = 1.0, progress: bool = True) -> Path:
    """Generate one recording into ``out_dir`` (replaced), marker last."""
    from spikeinterface.core.generate import (
        _ensure_unit_params,
        generate_sorting,
        generate_templates,
        generate_unit_locations,
    )
    from spikeinterface.generation import generate_drifting_recording

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rtsort.sim import write_ground_truth

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    fs = SAMPLING_RATE
    duration = max(1.0, round(spec.duration_s * duration_scale, 2))
    time_scale = duration / spec.duration_s
    n = spec.n_units
    rng = np.random.default_rng(spec.seed)
    probe = build_probe(spec.probe)
    pos = probe.contact_positions[:, :2]

    rates = _spread(*spec.firing_hz, n, rng)
    target_snr = _spread(*spec.snr, n, rng)
    sorting = generate_sorting(num_units=n, sampling_frequency=fs, durations=[duration], firing_rates=rates,
                               refractory_period_ms=4.0, seed=spec.seed)
    unit_locs = generate_unit_locations(n, pos, seed=spec.seed, distance_strict=False, **LAYOUTS[spec.layout])

    # template shapes with SpikeInterface's ranges, then amplitudes (alpha) set per unit for the target SNR
    ms_before, ms_after = 1.0, 3.0
    params = _ensure_unit_params(dict(alpha=1.0, spatial_decay=(15.0, 35.0), ellipse_shrink=(0.4, 1.0),
                                      ellipse_angle=(0.0, 2 * np.pi)), n, spec.seed)
    unit_tpl = generate_templates(pos, unit_locs, fs, ms_before, ms_after, seed=spec.seed, unit_params=params,
                                  mode="ellipsoid")
    peak1 = np.abs(unit_tpl).max(axis=(1, 2))
    params["alpha"] = np.asarray(target_snr * spec.noise_uV / np.maximum(peak1, 1e-12), dtype=np.float64)

    # displacement: one motion along y, scaled per unit by depth for the non-rigid kind
    n_bins = int(np.ceil(duration * MOTION_FS))
    times = (np.arange(n_bins) + 0.5) / MOTION_FS
    trace = displacement_trace(spec, times, duration, time_scale)
    y_range = (float(pos[:, 1].min()), float(pos[:, 1].max()))
    unit_factor = depth_factor(spec, unit_locs[:, 1], y_range)
    unit_disp = trace[:, None] * unit_factor[None, :]                       # (n_bins, n_units)
    lo, hi = np.floor(unit_disp.min() / GRID_UM), np.ceil(unit_disp.max() / GRID_UM)
    grid = np.arange(lo, hi + 1) * GRID_UM
    steps = np.stack([np.zeros_like(grid), grid], axis=1)                   # (n_steps, 2): x, y
    vectors = np.zeros((n_bins, 2, 1))
    vectors[:, 1, 0] = trace
    displacement_data = (np.stack([np.zeros_like(unit_disp), unit_disp], axis=2), vectors,
                         unit_factor[:, None], MOTION_FS, steps)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rec, sorting, extra = generate_drifting_recording(
            num_units=n, duration=duration, sampling_frequency=fs, probe=probe, unit_locations=unit_locs,
            displacement_data=displacement_data, sorting=sorting,
            generate_templates_kwargs=dict(ms_before=ms_before, ms_after=ms_after, mode="ellipsoid",
                                           unit_params=params),
            generate_noise_kwargs=dict(noise_levels=float(spec.noise_uV), spatial_decay=25.0),
            amplitude_std=0.05, extra_outputs=True, seed=spec.seed,
        )
    templates = extra["templates"].templates_array
    nbefore = int(extra["templates"].nbefore)
    snr = np.abs(templates).max(axis=(1, 2)) / spec.noise_uV

    depths = np.linspace(y_range[0], y_range[1],
                         max(2, int(np.ceil((y_range[1] - y_range[0]) / DEPTH_BIN_UM)) + 1))
    meta = {"corpus_id": spec.id, "split": spec.split, "spec": spec.to_dict(), "duration_s": duration,
            "duration_scale": duration_scale, "n_channels": spec.n_channels, "n_units": n,
            "sampling_rate": fs, "noise_uV": spec.noise_uV, "drift": spec.kind != "static", "kind": spec.kind,
            "seed": spec.seed}
    write_ground_truth(tmp, rec, sorting, pos, templates, nbefore, np.asarray(unit_locs), spec.noise_uV, meta,
                       progress=progress,
                       extra_truth=dict(unit_snr=snr.astype(np.float64), unit_firing_rate_hz=rates.astype(np.float64),
                                        unit_displacement_factor=unit_factor.astype(np.float64)))
    np.savez(tmp / "motion.npz", times_s=times, depths_um=depths,
             displacement_um=trace[:, None] * depth_factor(spec, depths, y_range)[None, :],
             unit_displacement_um=unit_disp, sampling_rate_hz=np.float64(MOTION_FS),
             kind=np.array(spec.kind), sign=np.array("positive = units appear at higher y on the probe"))
    marker = {"id": spec.id, "hash": spec.digest(duration_scale), "spec": spec.to_dict(),
              "duration_scale": duration_scale, "generator_version": GENERATOR_VERSION,
              "seconds_to_generate": round(time.perf_counter() - t0, 1)}
    (tmp / "corpus.json").write_text(json.dumps(marker, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def is_complete(rec_id: str, root=None, duration_scale: float = 1.0) -> bool:
    marker = recording_dir(rec_id, root) / "corpus.json"
    try:
        return json.loads(marker.read_text())["hash"] == SPECS[rec_id].digest(duration_scale)
    except (OSError, ValueError, KeyError):
        return False


def ensure(ids, root=None, duration_scale: float = 1.0, progress: bool = False, log=None) -> list:
    """Generate whichever of ``ids`` are missing or stale under ``root``; return their folders."""
    out = []
    for rec_id in ids:
        folder = recording_dir(rec_id, root)
        if not is_complete(rec_id, root, duration_scale):
            t0 = time.perf_counter()
            if log:
                log(f"generating {rec_id} -> {folder}")
            folder.parent.mkdir(parents=True, exist_ok=True)
            generate(SPECS[rec_id], folder, duration_scale, progress)
            if log:
                log(f"  {rec_id}: {time.perf_counter() - t0:.0f} s, {folder_size(folder) / 1e9:.2f} GB")
        out.append(folder)
    return out


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ------------------------------------------------------------------ tables
def drift_text(spec: Spec) -> str:
    d = spec.drift
    if spec.kind == "static":
        return "none"
    if spec.kind == "zigzag":
        return f"rigid zigzag +/-{d['amplitude_um']:g} um, period {d['period_s']:g} s"
    if spec.kind == "steps":
        return "rigid steps to " + ", ".join(f"{v:+g} um at {f * spec.duration_s:.0f} s" for f, v in d["steps"])
    if spec.kind == "ramp":
        return f"rigid ramp {d['start_um']:+g} -> {d['stop_um']:+g} um"
    shape = (f"zigzag +/-{d['amplitude_um']:g} um, period {d['period_s']:g} s" if d["shape"] == "zigzag"
             else f"random walk (max {d['amplitude_um']:g} um)")
    return f"{shape}, x{d['factor_bottom']:g} at the bottom to x{d['factor_top']:g} at the top"


TABLE_HEAD = ("| id | split | channels | units | noise (uV) | SNR | rate (Hz) | layout | drift | duration | seed |\n"
              "|---|---|---:|---:|---:|---|---|---|---|---:|---:|")


def table_row(s: Spec) -> str:
    return (f"| {s.id} | {s.split} | {s.n_channels} | {s.n_units} | {s.noise_uV:g} | {s.snr[0]:g}-{s.snr[1]:g} | "
            f"{s.firing_hz[0]:g}-{s.firing_hz[1]:g} | {s.layout} | {s.kind}: {drift_text(s)} | "
            f"{s.duration_s / 60:g} min | {s.seed} |")


def spec_table(ids=None) -> str:
    ids = ids or [s.id for s in RECORDINGS]
    return "\n".join([TABLE_HEAD] + [table_row(SPECS[i]) for i in ids])


def disk_bytes(spec: Spec) -> int:
    return int(spec.duration_s * SAMPLING_RATE) * spec.n_channels * 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("tune", "report", "all"), default="all")
    ap.add_argument("--out", type=Path, default=None, help="corpus folder (default: $RTSORT_CORPUS or "
                                                           "~/.cache/rtsort/corpus)")
    ap.add_argument("--only", nargs="+", metavar="ID", help="just these recordings")
    ap.add_argument("--list", action="store_true", help="print the corpus table and exit")
    ap.add_argument("--quick", action="store_true", help="durations x 0.02, a smoke test (default folder: "
                                                        "the corpus folder's quick/)")
    args = ap.parse_args(argv)
    if args.list:
        print(spec_table())
        total = sum(disk_bytes(s) for s in RECORDINGS)
        print(f"\n{len(RECORDINGS)} recordings ({len(TUNE)} tune, {len(REPORT)} report); "
              f"recording.bin total {total / 1e9:.1f} GB")
        return 0
    ids = args.only or ids_of(args.split)
    bad = [i for i in ids if i not in SPECS]
    if bad:
        print(f"corpus: unknown recording id(s): {', '.join(bad)}", file=sys.stderr)
        return 2
    if args.quick and args.out is None:
        args.out = default_root() / "quick"
    t0 = time.perf_counter()
    folders = ensure(ids, args.out, 0.02 if args.quick else 1.0, progress=sys.stderr.isatty(),
                     log=lambda m: print(m, flush=True))
    total = sum(folder_size(f) for f in folders)
    print(f"{len(folders)} recordings ready under {folders[0].parent if folders else args.out} "
          f"({total / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
