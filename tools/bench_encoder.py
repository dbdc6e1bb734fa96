"""Encoder cost per spike in onnxruntime (one thread), against the same architecture in torch.

    python tools/bench_encoder.py [--bundle B] [--batch 1 32 256] [--json FILE]

Without --bundle an untrained encoder with the default [train] shape is exported
and timed (the cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="time this bundle's encoder.onnx")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from rtsort.bench import encoder_costs
    from rtsort.bundle import load_bundle
    from rtsort.config import Config

    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            b = load_bundle(args.bundle)
            path, train_cfg = b.encoder_path, b.config.train
        else:
            import torch

            from rtsort.train.export import export_encoder
            from rtsort.train.model import SpikeEncoder

            cfg = Config()
            train_cfg, k = cfg.train, cfg.snippets.n_channels
            torch.manual_seed(0)
            model = SpikeEncoder(48, k, train_cfg.latent_dim, train_cfg.d_model, train_cfg.n_layers,
                                 train_cfg.n_heads, linear_path=train_cfg.linear_path).eval()
            path = Path(tmp) / "e.onnx"
            export_encoder(model, path, np.random.default_rng(0).normal(size=(64, 48, k)).astype(np.float32),
                           np.zeros((64, k, 2), np.float32))
        rows = [encoder_costs(path, train_cfg, b, max(5, args.repeat * 32 // max(b, 32))) for b in args.batch]
    for row in rows:
        th = row["torch_us_per_spike"]
        extra = f"   torch {th:7.1f} us/spike" if th else ""
        print(f"batch {row['batch']:>4d}: onnxruntime {row['onnxruntime_us_per_spike']:7.1f} us/spike "
              f"({row['onnxruntime_us_per_spike'] * row['batch']:.0f} us/call){extra}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
