#!/usr/bin/env python
"""Preprocess + detect speed: rtsort against SpikeInterface, same data, one thread.

For each channel count, simulates a recording (30 kHz), then times
  * rtsort: causal band-pass + common median reference + gradient detector,
    streamed in 1 s chunks (throughput) and in 1 ms chunks (per-chunk cost: the
    median of --repeat passes over 5 s, with the range of the passes' p99);
  * SpikeInterface: bandpass_filter + common_reference + detect_peaks(locally_exclusive)
    over the same samples, n_jobs=1.
Noise estimation is done before timing for both. Prints a table and writes JSON
with rtsort_x_realtime, spikeinterface_x_realtime and speedup per channel count.

    python tools/bench_detect.py [--channels 32 128 384] [--seconds 10] [--json FILE]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def bench_rtsort(rec, seconds_chunks=1.0, chunk_ms=1.0, latency_seconds=5.0, repeat=3):
    from rtsort.config import Config
    from rtsort.frontend import FrontEnd

    cfg = Config()
    fe = FrontEnd.for_recording(cfg, rec, snippets=False)
    fe.calibrate(rec)
    fe.warmup()
    raw = rec.get_traces(0, rec.n_samples)  # in memory: time compute, not disk
    step = int(seconds_chunks * rec.sampling_rate)
    fe.reset()
    n_events = 0
    t0 = time.perf_counter()
    for s in range(0, raw.shape[0], step):
        n_events += fe.process(raw[s : s + step]).events.size
    dt = time.perf_counter() - t0
    # per-chunk cost at chunk_ms, over several passes: this class of machine has
    # scheduling stalls, so the median pass is reported with the spread of all
    c = max(1, int(round(chunk_ms * rec.sampling_rate / 1000.0)))
    stop = min(raw.shape[0], int(latency_seconds * rec.sampling_rate))
    starts = range(0, stop - c + 1, c)
    passes = []
    for _ in range(repeat):
        fe.reset()
        times = np.empty(len(starts))
        for i, s in enumerate(starts):
            t = time.perf_counter()
            fe.process(raw[s : s + c])
            times[i] = time.perf_counter() - t
        us = times * 1e6
        passes.append({"p50": float(np.percentile(us, 50)), "p99": float(np.percentile(us, 99)),
                       "p99_9": float(np.percentile(us, 99.9)), "max": float(us.max())})
    return {
        "seconds": rec.duration_s,
        "wall_s": dt,
        "x_realtime": rec.duration_s / dt,
        "n_events": int(n_events),
        "chunk_samples": c,
        "chunk_us_p50": float(np.median([p["p50"] for p in passes])),
        "chunk_us_p99": float(np.median([p["p99"] for p in passes])),
        "chunk_us_p99_range": [min(p["p99"] for p in passes), max(p["p99"] for p in passes)],
        "chunk_us_max": max(p["max"] for p in passes),
        "n_chunks_per_pass": len(starts),
        "passes": passes,
    }


def bench_spikeinterface(rec):
    from rtsort.bench import detect_spikeinterface

    return detect_spikeinterface(np.asarray(rec.get_traces(0, rec.n_samples)), rec)


def machine_facts():
    import scipy

    from rtsort.bench import machine_facts as runtime_facts

    facts = {**runtime_facts(), "scipy": scipy.__version__}
    try:
        import spikeinterface

        facts["spikeinterface"] = spikeinterface.__version__
    except ImportError:
        pass
    return facts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, nargs="+", default=[32, 128, 384])
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of data per channel count")
    ap.add_argument("--chunk-ms", type=float, default=1.0, help="chunk for the per-chunk cost")
    ap.add_argument("--repeat", type=int, default=3, help="passes of 5 s of chunks for the per-chunk cost")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--no-spikeinterface", action="store_true", help="time rtsort only")
    args = ap.parse_args()

    from rtsort.sim import simulate

    results = {"machine": machine_facts(), "sampling_rate": 30000.0, "seconds": args.seconds, "configs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n_ch in args.channels:
            rec = simulate(Path(tmp) / f"c{n_ch}", n_ch, max(4, n_ch // 4), args.seconds, seed=0, progress=False)
            r = bench_rtsort(rec, chunk_ms=args.chunk_ms, repeat=args.repeat)
            row = {"channels": n_ch, "rtsort": r, "rtsort_x_realtime": r["x_realtime"]}
            if not args.no_spikeinterface:
                s = bench_spikeinterface(rec)
                row.update(spikeinterface=s, spikeinterface_x_realtime=s["x_real_time"],
                           speedup=r["x_realtime"] / s["x_real_time"])
            results["configs"].append(row)
            print(f"done {n_ch} channels", flush=True)

    print()
    print(f"preprocess + detect, 30 kHz, one thread, {args.seconds:g} s of data ({results['machine']['cpu']})")
    print(f"{'channels':>8} {'rtsort xRT':>11} {'SI xRT':>8} {'speedup':>8} "
          f"{'chunk':>6} {'p50 us':>8} {'p99 us':>8} {'p99 range':>13} {'max us':>8}")
    for row in results["configs"]:
        r = row["rtsort"]
        si = f"{row['spikeinterface_x_realtime']:8.1f}" if "spikeinterface" in row else f"{'-':>8}"
        sp = f"{row['speedup']:8.1f}" if "speedup" in row else f"{'-':>8}"
        print(f"{row['channels']:>8d} {r['x_realtime']:11.1f} {si} {sp} {r['chunk_samples']:>6d} "
              f"{r['chunk_us_p50']:8.1f} {r['chunk_us_p99']:8.1f} "
              f"{r['chunk_us_p99_range'][0]:6.0f}-{r['chunk_us_p99_range'][1]:<6.0f} {r['chunk_us_max']:8.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
