"""The ``rtsort`` command: thin subcommands that parse, build a config and call the library.

Bad arguments and bad input give a one-line error naming the problem and a
non-zero exit, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .errors import RtsortError

log = logging.getLogger("rtsort")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


# ---------------------------------------------------------------- simulate
def _add_simulate(sub):
    p = sub.add_parser(
        "simulate", formatter_class=_Formatter,
        help="write a ground-truth recording (recording.bin/.json + truth.npz)",
        description="Simulate a ground-truth recording with SpikeInterface's generators: realistic templates "
                    "on a two-column probe (20 um pitch), refractory spike trains and noise, written as "
                    "OUT_DIR/recording.bin + recording.json (int16, 0.195 uV/bit) and OUT_DIR/truth.npz. "
                    "The same seed gives the same bytes.",
    )
    p.add_argument("out_dir", type=Path, help="output folder")
    p.add_argument("--channels", type=_positive_int, default=32, help="number of channels")
    p.add_argument("--units", type=_positive_int, default=12, help="number of units")
    p.add_argument("--duration", type=_positive_float, default=30.0, help="duration in seconds")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--drift", action="store_true", help="move the probe 20 um up and down (zigzag)")
    p.add_argument("--sampling-rate", type=_positive_float, default=30000.0, help="sampling rate in Hz")
    p.add_argument("--noise", type=_positive_float, default=10.0, help="noise level in uV")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args) -> int:
    from .sim import simulate

    rec = simulate(args.out_dir, args.channels, args.units, args.duration, args.seed, args.drift,
                   args.sampling_rate, args.noise, progress=not args.quiet)
    truth = np.load(args.out_dir / "truth.npz")
    print(f"wrote {rec.source} ({rec.n_channels} channels, {rec.duration_s:g} s at {rec.sampling_rate:g} Hz) "
          f"and {args.out_dir / 'truth.npz'} ({truth['sample_index'].size} spikes of {args.units} units)")
    return 0


# ---------------------------------------------------------------- detect
def _add_detect(sub):
    p = sub.add_parser(
        "detect", formatter_class=_Formatter,
        help="detect spikes (no sorting) and write EVENTS.npz",
        description="Stream a recording through the causal preprocessing and the gradient detector, as the "
                    "runtime does, and write the events (sample_index, channel, amplitude in uV). With --truth, "
                    "report recall per SNR bin, precision and false positives against ground truth.",
    )
    p.add_argument("recording", type=Path, help="X.bin (with X.json) or any recording SpikeInterface reads")
    p.add_argument("--out", type=Path, required=True, help="events file (.npz)")
    p.add_argument("--config", type=Path, help="TOML configuration ([preprocess], [detect], [snippets])")
    p.add_argument("--truth", type=Path, help="truth.npz to score detection against")
    p.add_argument("--json", type=Path, help="write the detection-quality figures as JSON")
    p.set_defaults(func=_cmd_detect)


def _ground_truth(recording, truth_path: Path, config, max_seconds: float = 120.0):
    """Preprocess the first ``max_seconds`` once and build the scorer; return (GroundTruth, filtered)."""
    from .dsp import preprocess_array
    from .evaluate import GroundTruth

    truth = _load_truth(truth_path)
    n = min(recording.n_samples, int(max_seconds * recording.sampling_rate))
    filtered = preprocess_array(recording.get_traces(0, n), config.preprocess, recording.sampling_rate,
                                recording.gains_to_uV, recording.offsets_to_uV)
    scorer = GroundTruth(truth["sample_index"], truth["unit"], filtered, recording.probe.positions_um,
                         recording.sampling_rate, valid_stop=n - int(0.002 * recording.sampling_rate))
    return scorer, filtered


def _load_truth(path: Path) -> dict:
    from .errors import RecordingError

    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in ("sample_index", "unit")}
    except FileNotFoundError:
        raise RecordingError(f"{path}: truth file not found") from None
    except KeyError as exc:
        raise RecordingError(f"{path}: truth file lacks {exc}") from None
    except (ValueError, OSError) as exc:
        raise RecordingError(f"{path}: not a readable .npz truth file ({exc})") from None
    return out


def _print_quality(q: dict) -> None:
    print(f"  detections {q['n_detections']}, true spikes {q['n_true_spikes']}")
    print(f"  recall {q['recall']:.3f}   precision {q['precision']:.3f}   F1 {q['f1']:.3f}   "
          f"false positives {q['false_positives_per_s']:.1f}/s")
    print("  SNR bin      units  spikes  recall")
    for label, b in q["recall_by_snr"].items():
        rec = "   -" if b["recall"] is None else f"{b['recall']:.3f}"
        print(f"  {label:<11s} {b['n_units']:>5d} {b['n_spikes']:>7d}  {rec}")


def _save_events(path: Path, events, sampling_rate: float, noise) -> None:
    """Events file: sample_index (int64), channel (int32), amplitude (float32 uV), sampling_rate, noise_levels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, sample_index=events["sample_index"], channel=events["channel"], amplitude=events["amplitude"],
             sampling_rate=np.float64(sampling_rate), noise_levels=noise)


def _cmd_detect(args) -> int:
    from .config import load_config
    from .frontend import detect_recording
    from .io import open_recording

    config = load_config(args.config)
    rec = open_recording(args.recording)
    t0 = time.perf_counter()
    events, noise = detect_recording(rec, config, progress=not args.quiet)
    dt = time.perf_counter() - t0
    if args.out.suffix != ".npz":
        raise RtsortError(f"{args.out}: the events file must end in .npz")
    _save_events(args.out, events, rec.sampling_rate, noise)
    print(f"{events.size} events in {rec.duration_s:.1f} s of {rec.n_channels} channels, {dt:.1f} s "
          f"with noise calibration -> {args.out}")
    if args.truth:
        q = _ground_truth(rec, args.truth, config)[0].score(events)
        _print_quality(q)
        if args.json:
            args.json.write_text(json.dumps(q, indent=1) + "\n")
    return 0


# ---------------------------------------------------------------- demo
def _add_demo(sub):
    p = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="simulate a recording, detect spikes, score them against ground truth",
        description="End to end on built-in synthetic data: simulate a 32-channel ground-truth recording, "
                    "stream it through the causal preprocessing and the gradient detector, and compare with "
                    "the truth (and with SpikeInterface's locally_exclusive detector on the same data).",
    )
    p.add_argument("--out", type=Path, default=Path("rtsort_demo"), help="output folder")
    p.add_argument("--duration", type=_positive_float, default=30.0, help="seconds to simulate")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .config import Config
    from .frontend import detect_recording
    from .sim import simulate

    config = Config()
    out = args.out
    print(f"[1/3] simulating 32 channels, 16 units, {args.duration:g} s -> {out}")
    rec = simulate(out, 32, 16, args.duration, args.seed, progress=not args.quiet)
    print("[2/3] streaming it through preprocessing + gradient detector")
    t0 = time.perf_counter()
    events, noise = detect_recording(rec, config, chunk_s=0.001 * 30, progress=not args.quiet)
    dt = time.perf_counter() - t0
    _save_events(out / "events.npz", events, rec.sampling_rate, noise)
    print(f"      {events.size} events, streamed in 30 ms chunks; {dt:.1f} s with noise calibration and "
          f"kernel loading -> {out / 'events.npz'}")
    print("[3/3] scoring against ground truth (0.4 ms, 75 um)")
    from .evaluate import detect_locally_exclusive

    scorer, filtered = _ground_truth(rec, out / "truth.npz", config)
    report = {"rtsort_gradient": scorer.score(events)}
    _print_quality(report["rtsort_gradient"])
    print("  SpikeInterface locally_exclusive on the same preprocessed data:")
    report["si_locally_exclusive"] = scorer.score(
        detect_locally_exclusive(filtered, rec.probe.positions_um, rec.sampling_rate))
    _print_quality(report["si_locally_exclusive"])
    (out / "detection_quality.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"done: {out}/recording.bin, truth.npz, events.npz, detection_quality.json")
    return 0


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtsort", formatter_class=_Formatter,
        description="rtsort: real-time streaming spike sorting. Run 'rtsort COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"rtsort {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_simulate(sub)
    _add_detect(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except RtsortError as exc:
        if args.debug:
            raise
        print(f"rtsort {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rtsort {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
