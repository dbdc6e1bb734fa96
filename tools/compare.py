#!/usr/bin/env python
"""The honest comparison: rtsort against SpikeInterface's sorters on simulated ground truth.

On three simulated recordings (32 ch / 12 units; 32 ch / 24 crowded units with
more noise; 128 ch with drift) run rtsort (Transformer features), rtsort with
PCA features (same pipeline otherwise), tridesclous2 and spykingcircus2 (both
in-process, no containers), and score each with SpikeInterface's ground-truth
comparison (0.4 ms): well-detected units (accuracy >= 0.8), mean accuracy,
wall time (rtsort: train + sort).

    python tools/compare.py [--out compare_out] [--duration 60] [--sorters ...] [--recordings A B C]
                            [--seeds 0 1 2] [--json FILE] [--reuse]

--reuse keeps results already in OUT/results.json (the peers take minutes).
--seeds trains rtsort's rows with each training seed (default 0) and prints
each seed's row and, with more than one, the spread: the Transformer's
features depend on its random start, PCA's hardly.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np

from rtsort.config import Config
from rtsort.evaluate import sorting_accuracy
from rtsort.io import open_recording
from rtsort.pipeline import sort_recording
from rtsort.sim import simulate
from rtsort.train import train_bundle

RECORDINGS = {
    "A": dict(label="32 ch / 12 units", n_channels=32, n_units=12, noise_uV=10.0, drift=False, seed=1),
    "B": dict(label="32 ch / 24 crowded units, noise 15 uV", n_channels=32, n_units=24, noise_uV=15.0, drift=False,
              seed=2),
    "C": dict(label="128 ch / 40 units, drift", n_channels=128, n_units=40, noise_uV=10.0, drift=True, seed=3),
}
SORTERS = ("rtsort", "rtsort-pca", "tridesclous2", "spykingcircus2")


def run_rtsort(folder: Path, features: str, seed: int = 0):
    rec = open_recording(folder / "recording.bin")
    cfg = Config.from_dict({"train": {"features": features}})
    bundle = folder / (f"bundle_{features}" if seed == 0 else f"bundle_{features}_seed{seed}")
    t0 = time.perf_counter()
    train_bundle(rec, bundle, cfg, seed=seed, progress=False)
    spikes, _ = sort_recording(rec, bundle, progress=False)
    return spikes["sample_index"], spikes["unit"], time.perf_counter() - t0


def run_peer(folder: Path, sorter: str):
    import spikeinterface.core as si
    import spikeinterface.sorters as ss
    from probeinterface import Probe

    meta = json.loads((folder / "recording.json").read_text())
    rec = si.read_binary(folder / "recording.bin", sampling_frequency=meta["sampling_rate"], dtype=meta["dtype"],
                         num_channels=meta["n_channels"], gain_to_uV=meta["gain_to_uV"],
                         offset_to_uV=meta["offset_to_uV"])
    probe = Probe(ndim=2)
    probe.set_contacts(np.asarray(meta["channel_positions_um"]), shapes="circle", shape_params={"radius": 6})
    probe.set_device_channel_indices(np.arange(meta["n_channels"]))
    rec = rec.set_probe(probe) or rec
    t0 = time.perf_counter()
    so = ss.run_sorter(sorter, rec, folder=folder / f"out_{sorter}", remove_existing_folder=True, verbose=False,
                       job_kwargs=dict(n_jobs=2, progress_bar=False))
    dt = time.perf_counter() - t0
    idx, lab = [], []
    for u in so.unit_ids:
        st = so.get_unit_spike_train(u)
        idx.append(st)
        lab.append(np.full(st.size, int(np.flatnonzero(so.unit_ids == u)[0])))
    return np.concatenate(idx), np.concatenate(lab), dt


def rows(sorter: str, seeds: list) -> list:
    """(result name, training seed) of a sorter's rows: one per seed for rtsort's (seed 0 keeps the plain name)."""
    if not sorter.startswith("rtsort"):
        return [(sorter, 0)]
    return [(sorter if seed == 0 else f"{sorter}@seed{seed}", seed) for seed in seeds]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("compare_out"))
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--recordings", nargs="+", default=list(RECORDINGS), choices=list(RECORDINGS))
    ap.add_argument("--sorters", nargs="+", default=list(SORTERS), choices=list(SORTERS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="rtsort's training seeds (default: 0)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--reuse", action="store_true", help="keep results already in OUT/results.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if args.reuse and store.exists() else {}
    for key in args.recordings:
        spec = RECORDINGS[key]
        folder = args.out / key
        if not (folder / "truth.npz").exists():
            simulate(folder, spec["n_channels"], spec["n_units"], args.duration, spec["seed"], spec["drift"],
                     noise_uV=spec["noise_uV"], progress=False)
        truth = np.load(folder / "truth.npz")
        for sorter in args.sorters:
            for name, seed in rows(sorter, args.seeds):
                if f"{key}/{name}" in results:
                    continue
                if sorter.startswith("rtsort"):
                    idx, lab, dt = run_rtsort(folder, "pca" if sorter == "rtsort-pca" else "transformer", seed)
                else:
                    idx, lab, dt = run_peer(folder, sorter)
                rep = sorting_accuracy(idx, lab, truth["sample_index"], truth["unit"], float(truth["sampling_rate"]))
                results[f"{key}/{name}"] = {**rep["summary"], "wall_s": dt, "recording": spec["label"],
                                            "accuracy": [u["accuracy"] for u in rep["units"]]}
                store.write_text(json.dumps(results, indent=1) + "\n")
                s = results[f"{key}/{name}"]
                print(f"{key} {name:<22s} well detected {s['well_detected']:>3d}/{s['n_true_units']:<3d} "
                      f"mean accuracy {s['mean_accuracy']:.3f}  {dt:7.1f} s", flush=True)
    print()
    print("| recording | sorter | well detected | mean accuracy | wall time |")
    print("|---|---|---:|---:|---:|")
    for key in args.recordings:
        for sorter in args.sorters:
            for name, _ in rows(sorter, args.seeds):
                s = results.get(f"{key}/{name}")
                if s:
                    print(f"| {key}: {s['recording']} | {name} | {s['well_detected']} / {s['n_true_units']} | "
                          f"{s['mean_accuracy']:.3f} | {s['wall_s']:.0f} s |")
    if len(args.seeds) > 1:
        print()
        print("| recording | sorter | well detected per seed | mean | mean accuracy per seed |")
        print("|---|---|---|---:|---|")
        for key in args.recordings:
            for sorter in (x for x in args.sorters if x.startswith("rtsort")):
                got = [results.get(f"{key}/{name}") for name, _ in rows(sorter, args.seeds)]
                if all(got):
                    well = " / ".join(str(g["well_detected"]) for g in got)
                    seeds = " / ".join(map(str, args.seeds))
                    mean = np.mean([g["well_detected"] for g in got])
                    acc = " / ".join(f"{g['mean_accuracy']:.3f}" for g in got)
                    print(f"| {key} | {sorter} | {well} (seeds {seeds}) | {mean:.1f} | {acc} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
