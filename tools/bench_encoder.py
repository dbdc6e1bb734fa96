"""Encoder cost per spike in onnxruntime (one thread), against the same encoder in torch.

    python tools/bench_encoder.py [--bundle B] [--batch 32] [--json FILE]

Without --bundle an untrained encoder with the default [train] shape is timed
(the cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def time_call(fn, repeat: int) -> float:
    for _ in range(20):
        fn()
    best = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best.append((time.perf_counter() - t0) / repeat)
    return float(np.median(best))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="time this bundle's encoder.onnx")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from rtsort.config import Config
    from rtsort.features import Encoder

    cfg = Config()
    t, k = 48, cfg.snippets.n_channels
    torch_enc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            path = args.bundle / "encoder.onnx"
        else:
            import torch

            from rtsort.train.export import export_encoder
            from rtsort.train.model import SpikeEncoder

            torch.manual_seed(0)
            tc = cfg.train
            torch_enc = SpikeEncoder(t, k, tc.latent_dim, tc.d_model, tc.n_layers, tc.n_heads).eval()
            path = Path(tmp) / "e.onnx"
            ex = np.random.default_rng(0).normal(size=(64, t, k)).astype(np.float32)
            export_encoder(torch_enc, path, ex, np.zeros((64, k, 2), np.float32))
        enc = Encoder(path, threads=1)
        t, k = enc.input_shape
        rows = []
        for b in args.batch:
            x = np.random.default_rng(1).normal(size=(b, t, k)).astype(np.float32)
            p = np.random.default_rng(2).normal(size=(b, k, 2)).astype(np.float32) * 20
            ort_s = time_call(lambda: enc(x, p), args.repeat)
            row = {"batch": b, "onnxruntime_us_per_spike": ort_s / b * 1e6, "onnxruntime_us_per_call": ort_s * 1e6}
            if torch_enc is not None:
                import torch

                torch.set_num_threads(1)
                xt, pt = torch.from_numpy(x), torch.from_numpy(p)
                with torch.no_grad():
                    th_s = time_call(lambda: torch_enc(xt, pt), args.repeat // 2)
                row["torch_us_per_spike"] = th_s / b * 1e6
            rows.append(row)
            extra = f"   torch {row['torch_us_per_spike']:7.1f} us/spike" if "torch_us_per_spike" in row else ""
            print(f"batch {b:>4d}: onnxruntime {row['onnxruntime_us_per_spike']:7.1f} us/spike "
                  f"({row['onnxruntime_us_per_call']:.0f} us/call){extra}")
    if args.json:
        args.json.write_text(json.dumps({"input": [t, k], "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
