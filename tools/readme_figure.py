"""Make the README's picture: the unit waveforms a bundle learns from a small simulated recording.

    .venv/bin/python tools/readme_figure.py [--out docs/img/unit_waveforms.png] [--keep DIR]

Simulates 30 s of a 32-channel probe with 12 units (``rtsort simulate``, seed 0),
trains a bundle on it (``rtsort train``, seed 0) and draws every unit's mean
waveform on its four biggest channels with ``rtsort.report.plot_waveforms``,
the plot ``rtsort report`` puts in its HTML page. About 30 s of CPU. The PNG is
stored as a 64-colour palette image when Pillow is present, which keeps it well
under 200 KB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rtsort.bundle import load_bundle  # noqa: E402
from rtsort.cli import main as rtsort_main  # noqa: E402
from rtsort.report import plot_waveforms  # noqa: E402

CHANNELS, UNITS, DURATION_S, SEED = 32, 12, 30.0, 0
PALETTE_COLOURS = 64


def _shrink(path: Path) -> None:
    """Store the PNG as a palette image (a line plot needs few colours); left as it is without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def make_figure(out: Path, work: Path) -> Path:
    rec_dir, bundle_dir = work / "sim", work / "bundle"
    for argv in (["-q", "simulate", str(rec_dir), "--channels", str(CHANNELS), "--units", str(UNITS),
                  "--duration", str(DURATION_S), "--seed", str(SEED)],
                 ["-q", "train", str(rec_dir / "recording.bin"), "--out", str(bundle_dir), "--seed", str(SEED)]):
        if rtsort_main(argv) != 0:
            raise SystemExit(f"rtsort {' '.join(argv)} failed")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_waveforms(load_bundle(bundle_dir), out)
    _shrink(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "unit_waveforms.png")
    parser.add_argument("--keep", type=Path, help="keep the simulated recording and bundle in this folder")
    args = parser.parse_args(argv)
    if args.keep:
        out = make_figure(args.out, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="rtsort-figure-") as tmp:
            out = make_figure(args.out, Path(tmp))
    print(f"{out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
