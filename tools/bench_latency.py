#!/usr/bin/env python
"""End-to-end latency of the runtime, as a closed-loop experiment sees it.

1. In process: ``run_stream`` over the recording in 1 ms chunks, as fast as it
   goes: compute per chunk (total and per stage) and throughput.
2. Over LSL (three processes): ``rtsort replay --to lsl:`` at 1x, ``rtsort run
   --source lsl: --sink lsl:`` and this process as the consumer of the marker
   outlet, measuring ``local_clock() - marker timestamp`` (the trough's LSL
   time) for every spike, and the samples lost.

Run it inside the loopback-only namespace:

    bash tools/loopback.sh .venv/bin/python tools/bench_latency.py --recording R.bin --bundle B [--seconds 20]

Without --recording/--bundle it simulates 384 channels / 100 units and trains
a bundle first (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def pct(v, scale=1.0):
    v = np.asarray(v, dtype=np.float64) * scale
    return {k: float(np.percentile(v, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9),
                                                       ("max", 100))} if v.size else {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recording", type=Path)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--chunk-ms", type=float, default=1.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import pylsl

    from rtsort.pipeline import run_stream

    work = Path(tempfile.mkdtemp(prefix="rtsort-bench-"))
    if args.recording is None or args.bundle is None:
        from rtsort.sim import simulate
        from rtsort.train import train_bundle

        rec = simulate(work / "sim", 384, 100, max(30.0, args.seconds), seed=4, progress=False)
        train_bundle(rec, work / "bundle", progress=False)
        args.recording, args.bundle = work / "sim/recording.bin", work / "bundle"

    report = {"recording": str(args.recording), "bundle": str(args.bundle), "chunk_ms": args.chunk_ms}
    # 1. in process, as fast as possible
    st = run_stream(args.bundle, f"file:{args.recording}", [], duration=args.seconds, chunk_ms=args.chunk_ms)
    report["in_process"] = {k: st[k] for k in ("chunks", "spikes", "compute_ms", "stage_ms", "wait_ms")}
    c = st["compute_ms"]
    print(f"in process: {st['chunks']} chunks, {st['spikes']} spikes; compute per chunk p50 {c['p50']:.3f} "
          f"p99 {c['p99']:.3f} p99.9 {c['p99.9']:.3f} max {c['max']:.3f} ms")
    for name, s in st["stage_ms"].items():
        print(f"   {name:<10s} p50 {s['p50']:.3f}  p99 {s['p99']:.3f} ms")

    # 2. over LSL, three processes, 1x
    name, markers = f"bench-src-{os.getpid()}", f"bench-markers-{os.getpid()}"
    stats = work / "run.json"
    env = dict(os.environ)
    runner = subprocess.Popen([sys.executable, "-m", "rtsort", "-q", "run", "--bundle", str(args.bundle),
                               "--source", f"lsl:{name}", "--sink", f"lsl:{markers}", "--idle-timeout", "2",
                               "--resolve-timeout", "30", "--stats", str(stats)], env=env)
    sender = subprocess.Popen([sys.executable, "-m", "rtsort", "-q", "replay", str(args.recording), "--to",
                               f"lsl:{name}", "--chunk-ms", str(args.chunk_ms), "--duration", str(args.seconds)],
                              env=env, stdout=subprocess.PIPE, text=True)
    info = pylsl.resolve_byprop("name", markers, timeout=60)
    inlet = pylsl.StreamInlet(info[0], processing_flags=pylsl.proc_clocksync)
    inlet.open_stream(timeout=10)
    inlet.time_correction(timeout=10)
    lat, n = [], 0
    while runner.poll() is None:
        x, ts = inlet.pull_chunk(timeout=0.1, max_samples=4096, as_numpy=True, min_samples=1)
        if len(ts):
            lat.extend(pylsl.local_clock() - ts)
            n += len(ts)
    inlet.close_stream()
    out, _ = sender.communicate(timeout=30)
    run = json.loads(stats.read_text())
    report["lsl"] = {"markers_received": n, "trough_to_marker_ms": pct(lat, 1000.0), "replay": out.strip(),
                     "run": {k: run[k] for k in ("chunks", "samples", "spikes", "gaps", "gap_samples",
                                                 "skipped_encoding", "late_chunks", "compute_ms", "wait_ms",
                                                 "trough_to_emit_ms")}}
    lt = report["lsl"]["trough_to_marker_ms"]
    print(f"over LSL at 1x: {n} markers; trough to marker received p50 {lt['p50']:.2f} p99 {lt['p99']:.2f} "
          f"max {lt['max']:.2f} ms; samples {run['samples']}, gaps {run['gaps']} ({run['gap_samples']} samples), "
          f"not encoded {run['skipped_encoding']}")
    print(f"   {out.strip()}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
