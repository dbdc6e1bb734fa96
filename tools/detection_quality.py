#!/usr/bin/env python
"""Detection quality on a larger simulated recording: rtsort's gradient detector
against SpikeInterface's detect_peaks(locally_exclusive) with its defaults, on the
same (rtsort-preprocessed) data. Recall per SNR bin, precision, false positives, F1.

    python tools/detection_quality.py [--channels 64] [--units 40] [--duration 60] [--seed 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from rtsort.config import Config
from rtsort.dsp import preprocess_array
from rtsort.evaluate import compare_detectors
from rtsort.sim import simulate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--units", type=int, default=40)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = Config()
    with tempfile.TemporaryDirectory() as tmp:
        rec = simulate(tmp, args.channels, args.units, args.duration, args.seed, progress=False)
        truth = dict(np.load(Path(tmp) / "truth.npz"))
        x = preprocess_array(rec.get_traces(0, rec.n_samples), cfg.preprocess, rec.sampling_rate,
                             rec.gains_to_uV, rec.offsets_to_uV, rec.probe.positions_um)
    results = compare_detectors(x, truth["sample_index"], truth["unit"], rec.probe, rec.sampling_rate, cfg.detect,
                                valid_stop=x.shape[0] - 60)
    bins = list(results["rtsort_gradient"]["recall_by_snr"])
    print(f"{args.channels} channels, {args.units} units, {args.duration:g} s, seed {args.seed}; "
          "match: 0.4 ms, 75 um")
    print(f"{'detector':<22}" + "".join(f"{b:>10}" for b in bins) + f"{'F1':>7}{'FP rate':>9}{'FP/s':>7}")
    print(f"{'(units per bin)':<22}" + "".join(
        f"{results['rtsort_gradient']['recall_by_snr'][b]['n_units']:>10d}" for b in bins))
    for name, q in results.items():
        cells = "".join(f"{(q['recall_by_snr'][b]['recall'] or float('nan')):>10.3f}" for b in bins)
        print(f"{name:<22}{cells}{q['f1']:>7.3f}{q['false_positive_rate']:>9.3f}{q['false_positives_per_s']:>7.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
