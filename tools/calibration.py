#!/usr/bin/env python
"""How far each spike's ``confidence`` can be trusted: reliability on ground-truth recordings.

For every recording of the development corpus asked for (``tools/corpus.py``),
rtsort is trained (seed 0; cached in OUT/ID/bundle) and the recording sorted
through the runtime pipeline once per confidence temperature
(``[assign] confidence_temperature``: the labels do not change, only the
confidences). A labelled spike is *right* when a true spike of the true unit
its sorted unit is matched to (SpikeInterface's ground-truth comparison,
Hungarian matching, 0.4 ms) lies within 0.4 ms of it; spikes of a sorted unit
matched to no true unit are wrong.

Per temperature it reports, pooled over the recordings and per recording:
the share of right labels among spikes with confidence >= 0.9 (the promise
closed-loop code gates on: at least 0.9), the share of labelled spikes that
reach 0.9, the expected calibration error (10 bins) and the log loss. The
temperature to ship is the one of least pooled log loss on the **tune** half
(the standard temperature scaling); the report half is only scored.

    python tools/calibration.py --split tune --out /tmp/calib
    python tools/calibration.py --split report --temperatures 4 --out /tmp/calib
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

from rtsort.bundle import load_bundle  # noqa: E402
from rtsort.evaluate import right_labels  # noqa: E402
from rtsort.io import open_recording  # noqa: E402
from rtsort.pipeline import sort_recording  # noqa: E402

log = logging.getLogger("calibration")
BINS = np.linspace(0.0, 1.0, 11)
GATE = 0.9


def scores(conf: np.ndarray, right: np.ndarray) -> dict:
    """Reliability of confidences ``conf`` (NaN left out) against ``right``."""
    ok = np.isfinite(conf)
    p, r = np.clip(conf[ok].astype(np.float64), 1e-6, 1 - 1e-6), right[ok]
    high = p >= GATE
    which = np.clip(np.digitize(p, BINS) - 1, 0, BINS.size - 2)
    ece = sum(abs(p[which == b].mean() - r[which == b].mean()) * np.count_nonzero(which == b)
              for b in range(BINS.size - 1) if np.any(which == b)) / max(p.size, 1)
    return {"spikes": int(p.size), "right": float(r.mean()) if p.size else float("nan"),
            "at_gate": float(high.mean()) if p.size else float("nan"),
            "right_at_gate": float(r[high].mean()) if high.any() else float("nan"),
            "ece": float(ece), "log_loss": float(-np.mean(r * np.log(p) + (~r) * np.log(1 - p))) if p.size else 0.0,
            "reliability": [[float(BINS[b]), float(BINS[b + 1]), int(np.count_nonzero(which == b)),
                             float(r[which == b].mean()) if np.any(which == b) else None]
                            for b in range(BINS.size - 1)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--split", choices=("tune", "report"), default="tune")
    ap.add_argument("--ids", nargs="+", help="recordings of the split (default: all of it)")
    ap.add_argument("--temperatures", nargs="+", type=float, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--out", type=Path, required=True, help="work folder (bundles are cached here)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ids = args.ids or list(corpus.ids_of(args.split))
    bad = [i for i in ids if i not in corpus.ids_of(args.split)]
    if bad:
        ap.error(f"not in the {args.split} half: {', '.join(bad)}")
    corpus.ensure(ids)
    per = {t: {} for t in args.temperatures}
    pooled = {t: ([], []) for t in args.temperatures}
    for rec_id in ids:
        folder = corpus.recording_dir(rec_id)
        rec = open_recording(folder / "recording.bin")
        bundle_dir = args.out / rec_id / "bundle"
        if not (bundle_dir / "manifest.json").exists():
            from rtsort.config import Config
            from rtsort.train import train_bundle

            log.info("%s: training", rec_id)
            train_bundle(rec, bundle_dir, Config(), seed=0, progress=False)
        truth = np.load(folder / "truth.npz")
        right = None
        for t in args.temperatures:
            bundle = load_bundle(bundle_dir)
            bundle.config = replace(bundle.config, assign=replace(bundle.config.assign, confidence_temperature=t))
            spikes, _ = sort_recording(rec, bundle, progress=False)
            lab = spikes[spikes["unit"] >= 0]
            if right is None:  # the labels are the same at every temperature
                right = right_labels(spikes, truth["sample_index"], truth["unit"], rec.sampling_rate)
            per[t][rec_id] = scores(lab["confidence"], right)
            pooled[t][0].append(lab["confidence"])
            pooled[t][1].append(right)
            s = per[t][rec_id]
            log.info("%s T=%g: %d labelled, %.3f right; conf >= %.1f: %.3f of them, %.3f right; ECE %.3f",
                     rec_id, t, s["spikes"], s["right"], GATE, s["at_gate"], s["right_at_gate"], s["ece"])
    results = {"split": args.split, "ids": ids, "gate": GATE,
               "temperatures": {str(t): {"pooled": scores(np.concatenate(pooled[t][0]), np.concatenate(pooled[t][1])),
                                         "recordings": per[t]} for t in args.temperatures}}
    best = min(args.temperatures, key=lambda t: results["temperatures"][str(t)]["pooled"]["log_loss"])
    results["least_log_loss"] = best
    print(f"| temperature | labelled | right | conf >= {GATE} | right among them | worst recording | ECE | log loss |")
    print("|---|---|---|---|---|---|---|---|")
    for t in args.temperatures:
        r = results["temperatures"][str(t)]
        p = r["pooled"]
        worst = min((v["right_at_gate"] for v in r["recordings"].values() if np.isfinite(v["right_at_gate"])),
                    default=float("nan"))
        print(f"| {t:g} | {p['spikes']} | {p['right']:.3f} | {p['at_gate']:.3f} | {p['right_at_gate']:.3f} | "
              f"{worst:.3f} | {p['ece']:.3f} | {p['log_loss']:.3f} |")
    print(f"least log loss: temperature {best:g}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
