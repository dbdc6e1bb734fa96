#!/usr/bin/env python
"""End-to-end latency of the runtime on one recording and bundle, as a closed-loop experiment sees it.

1. In process: ``run_stream`` over the recording in 1 ms chunks, as fast as it
   goes: compute per chunk (total and per stage).
2. Over LSL (three processes): ``rtsort replay --to lsl:`` at 1x, ``rtsort run
   --source lsl: --sink lsl:`` and this process as the consumer of the marker
   outlet: trough-to-marker latency of every spike, gaps and late chunks.

The same measurements as ``rtsort bench --transport inproc lsl``, on a recording
and bundle of your choice. Run it inside the loopback-only namespace:

    bash tools/loopback.sh .venv/bin/python tools/bench_latency.py --recording R.bin --bundle B [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rtsort.bench import end_to_end, in_process


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recording", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--chunk-ms", type=float, default=1.0)
    ap.add_argument("--realtime", action="store_true", help="run the LSL sorter with SCHED_FIFO (rtsort run --realtime)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    ip = in_process(args.recording, args.bundle, args.chunk_ms, args.seconds)
    c = ip["compute_ms"]
    print(f"in process: {ip['chunks']} chunks, {ip['spikes']} spikes; compute per chunk p50 {c['p50']:.3f} "
          f"p99 {c['p99']:.3f} p99.9 {c['p99.9']:.3f} max {c['max']:.3f} ms")
    for name, s in ip["stage_ms"].items():
        print(f"   {name:<10s} p50 {s['p50']:.3f}  p99 {s['p99']:.3f} ms")
    lsl = end_to_end(args.recording, args.bundle, "lsl", args.chunk_ms, args.seconds, args.realtime)
    lt = lsl["trough_to_event_ms"]
    print(f"over LSL at 1x: {lsl['events_received']} markers; trough to marker received p50 {lt['p50']:.2f} "
          f"p99 {lt['p99']:.2f} max {lt['max']:.2f} ms; samples {lsl['samples']}, gaps {lsl['gaps']} "
          f"({lsl['gap_samples']} samples), not encoded {lsl['skipped_encoding']} in {lsl['late_chunks']} late chunks")
    print(f"   {lsl['replay']}")
    if args.json:
        args.json.write_text(json.dumps({"recording": str(args.recording), "bundle": str(args.bundle),
                                         "chunk_ms": args.chunk_ms, "in_process": ip, "lsl": lsl}, indent=1) + "\n")


if __name__ == "__main__":
    main()
