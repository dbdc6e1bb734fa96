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


def _recording_arg(p) -> None:
    p.add_argument("recording", type=Path, help="X.bin (with X.json) or any recording SpikeInterface reads")


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
    _recording_arg(p)
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
                                recording.gains_to_uV, recording.offsets_to_uV, recording.probe.positions_um)
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


# ---------------------------------------------------------------- train
def _add_train(sub):
    p = sub.add_parser(
        "train", formatter_class=_Formatter,
        help="learn units from a recording and write a bundle",
        description="Preprocess and detect through the runtime's streaming front end, cut snippets, train the "
                    "Transformer autoencoder (or PCA, [train] features = \"pca\"), export its encoder to ONNX, "
                    "cluster latent + position features into units, score every unit, and write BUNDLE_DIR "
                    "(manifest.json, encoder.onnx, centroids). Needs the 'train' extra (torch).",
    )
    _recording_arg(p)
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--config", type=Path, help="TOML configuration (tables preprocess, detect, snippets, train, "
                                                "cluster)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bundle)")
    p.set_defaults(func=_cmd_train)


def _print_units(units: list) -> None:
    print("  unit  spikes   rate Hz    SNR  ISI viol.  presence  isolation  silhouette  flags")
    for u in units:
        iso = u["isolation_distance"]
        iso_s = "      -" if iso is None or not np.isfinite(iso) else f"{iso:7.1f}"
        sil = u["silhouette"]
        sil_s = "     -" if sil is None or not np.isfinite(sil) else f"{sil:6.2f}"
        print(f"  {u['unit']:>4d} {u['n_spikes']:>7d} {u['firing_rate_hz']:>9.2f} {u['snr']:>6.1f} "
              f"{u['isi_violations_ratio']:>10.2f} {u['presence_ratio']:>9.2f}    {iso_s}      {sil_s}  "
              f"{','.join(u['flags']) or 'ok'}")


def _train(recording_path: Path, out: Path, config, seed: int, quiet: bool):
    try:
        from .train import train_bundle
    except ImportError as exc:
        raise RtsortError(f"training needs the 'train' extra ({exc}): pip install 'rtsort[train]'") from None
    from .io import open_recording

    rec = open_recording(recording_path)
    return rec, train_bundle(rec, out, config, seed=seed, progress=not quiet)


def _cmd_train(args) -> int:
    from .config import load_config

    config = load_config(args.config)
    rec, result = _train(args.recording, args.out, config, args.seed, args.quiet)
    t = result.timings
    print(f"{len(result.units)} units from {result.spikes.size} spikes in {rec.duration_s:.1f} s of "
          f"{rec.n_channels} channels; trained in {t['total_s']:.1f} s (detect {t['detect_s']:.1f}, fit "
          f"{t['fit_s']:.1f}, encode {t['encode_s']:.1f}, cluster {t['cluster_s']:.1f}) -> {args.out}")
    _print_units(result.units)
    return 0


# ---------------------------------------------------------------- sort
def _add_sort(sub):
    p = sub.add_parser(
        "sort", formatter_class=_Formatter,
        help="sort a recording with a bundle, as fast as possible",
        description="Run the runtime's pipeline (the same objects 'rtsort run' uses) over a file in large chunks "
                    "and write SPIKES.npz (sample_index, unit (-1 = unassigned), channel, amplitude, "
                    "sampling_rate).",
    )
    _recording_arg(p)
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory from 'rtsort train'")
    p.add_argument("--out", type=Path, required=True, help="spikes file (.npz)")
    p.add_argument("--chunk-s", type=_positive_float, default=1.0, help="chunk length in seconds")
    p.add_argument("--threads", type=_positive_int, default=1, help="onnxruntime threads")
    p.add_argument("--track-rate", type=float, metavar="RATE",
                   help="let centroids follow slow drift (0-1; overrides the bundle's [assign] track_rate)")
    p.add_argument("--workers", type=_positive_int,
                   help="sort in time blocks on this many Dask worker processes and stitch them (a margin of "
                        "max(2 s, 5 x motion.tau_s) before each block; needs the 'scale' extra); default: one "
                        "process, no Dask")
    p.add_argument("--scheduler",
                   help="with blocks: 'local' (a LocalCluster of --workers processes on 127.0.0.1) or a running "
                        "Dask scheduler, tcp://HOST:8786 (its workers must see the same paths)")
    p.add_argument("--block-s", type=_positive_float,
                   help="with blocks: block length in seconds (default: one block per worker)")
    p.add_argument("--margin-s", type=_positive_float,
                   help="with blocks: warm-up before each block, rounded up to whole motion steps (default: "
                        "max(2 s, 5 x motion.tau_s), 2 s without motion correction; with it, 40 x tau_s lets the "
                        "motion tracker forget its start below float64 resolution: docs/scale.md)")
    p.set_defaults(func=_cmd_sort)


def _sort(recording_path: Path, bundle_path: Path, out: Path, chunk_s: float, threads: int, quiet: bool,
          track_rate: float | None = None):
    from .io import open_recording, save_spikes
    from .pipeline import sort_recording

    if out.suffix != ".npz":
        raise RtsortError(f"{out}: the spikes file must end in .npz")
    rec = open_recording(recording_path)
    spikes, dt = sort_recording(rec, bundle_path, chunk_s=chunk_s, progress=not quiet, threads=threads,
                                track_rate=track_rate)
    save_spikes(out, spikes, rec.sampling_rate)
    n_un = int(np.sum(spikes["unit"] < 0))
    print(f"{spikes.size} spikes ({n_un} unassigned) in {rec.duration_s:.1f} s of {rec.n_channels} channels; "
          f"sorted in {dt:.1f} s ({rec.duration_s / max(dt, 1e-9):.1f}x real time) -> {out}")
    return spikes


def _cmd_sort(args) -> int:
    if args.workers is None and args.scheduler is None:
        if args.block_s is not None or args.margin_s is not None:
            raise RtsortError("--block-s and --margin-s need --workers or --scheduler (blocks are sorted on Dask)")
        _sort(args.recording, args.bundle, args.out, args.chunk_s, args.threads, args.quiet, args.track_rate)
        return 0
    from .io import save_spikes
    from .scale import sort_blocks

    if args.out.suffix != ".npz":
        raise RtsortError(f"{args.out}: the spikes file must end in .npz")
    spikes, info = sort_blocks(args.recording, args.bundle, args.workers, args.scheduler, args.chunk_s, args.threads,
                               args.track_rate, args.block_s, args.margin_s, progress=not args.quiet)
    save_spikes(args.out, spikes, info["sampling_rate"])
    n_un = int(np.sum(spikes["unit"] < 0))
    dt, duration = info["seconds"], info["duration_s"]
    print(f"{spikes.size} spikes ({n_un} unassigned) in {duration:.1f} s of {info['n_channels']} channels; "
          f"sorted in {dt:.1f} s ({duration / max(dt, 1e-9):.1f}x real time) as {info['blocks']} blocks of "
          f"{info['block_s']:.1f} s (margin {info['margin_s']:.1f} s) on {info['workers']} workers -> {args.out}")
    return 0


# ---------------------------------------------------------------- batch
def _add_batch(sub):
    p = sub.add_parser(
        "batch", formatter_class=_Formatter,
        help="train and sort many sessions on Dask (SESSIONS.toml)",
        description="Train and sort every [[session]] of SESSIONS.toml as one Dask task each, as 'rtsort train' "
                    "and 'rtsort sort' would on each alone (same bundle, same spikes). A session table has "
                    "recording (required; relative paths resolve against the TOML's folder), name (default: the "
                    "recording's stem), bundle (sort with it, no training), config (a TOML configuration) and "
                    "seed (default 0). Outputs: DIR/NAME/bundle/, DIR/NAME/spikes.npz, DIR/NAME/done.json and "
                    "DIR/summary.json. A failing session is reported and the others go on; a second run skips "
                    "the sessions whose done.json still matches their inputs and outputs. Needs the 'scale' extra.",
    )
    p.add_argument("sessions", type=Path, help="SESSIONS.toml")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--scheduler", default="local",
                   help="'local' (a LocalCluster on 127.0.0.1) or a running Dask scheduler, tcp://HOST:8786 (its "
                        "workers must see the same paths)")
    p.add_argument("--workers", type=_positive_int,
                   help="local worker processes, one thread each (default: one per core, at most one per session)")
    p.set_defaults(func=_cmd_batch)


def _cmd_batch(args) -> int:
    from .scale import run_batch

    summary = run_batch(args.sessions, args.out, args.scheduler, args.workers, progress=not args.quiet)
    print("  session               status   units  good   spikes  unassigned   wall s")
    for r in summary["sessions"]:
        def num(key, fmt="d"):
            return "-" if r.get(key) is None else format(r[key], fmt)

        un = "-" if not r.get("spikes") else f"{100 * r['unassigned'] / r['spikes']:.1f} %"
        print(f"  {r['name']:<20.20s} {r['status']:<8s} {num('units'):>5s} {num('good_units'):>5s} "
              f"{num('spikes'):>8s} {un:>11s} {num('wall_s', '.1f'):>8s}")
    for r in summary["sessions"]:
        if r["status"] == "failed":
            print(f"rtsort batch: session {r['name']}: error: {r['error']}", file=sys.stderr)
    print(f"{len(summary['sessions'])} sessions ({summary['failed']} failed) in {summary['wall_s']:.1f} s -> "
          f"{args.out / 'summary.json'}")
    return 1 if summary["failed"] else 0


# ---------------------------------------------------------------- eval
def _add_eval(sub):
    p = sub.add_parser(
        "eval", formatter_class=_Formatter,
        help="score a spikes file against ground truth",
        description="SpikeInterface's ground-truth comparison (0.4 ms tolerance): per true unit accuracy, "
                    "precision and recall against its best-matching sorted unit; well-detected units "
                    "(accuracy >= 0.8), mean accuracy and false-positive units. Unassigned spikes (-1) are "
                    "left out.",
    )
    p.add_argument("spikes", type=Path, help="SPIKES.npz from 'rtsort sort' or 'rtsort run'")
    p.add_argument("--truth", type=Path, required=True, help="truth.npz (sample_index, unit)")
    p.add_argument("--json", type=Path, help="write every figure as JSON")
    p.add_argument("--delta-ms", type=_positive_float, default=0.4, help="match tolerance in ms")
    p.set_defaults(func=_cmd_eval)


def _eval(spikes_path: Path, truth_path: Path, delta_ms: float = 0.4, json_path: Path | None = None) -> dict:
    from .evaluate import sorting_accuracy
    from .io import load_spikes

    spikes, fs = load_spikes(spikes_path)
    truth = _load_truth(truth_path)
    report = sorting_accuracy(spikes["sample_index"], spikes["unit"], truth["sample_index"], truth["unit"], fs,
                              delta_ms)
    s = report["summary"]
    print("  true unit  spikes  accuracy  precision  recall  sorted unit")
    for u in report["units"]:
        print(f"  {u['unit']:>9d} {u['n_spikes']:>7d} {u['accuracy']:>9.3f} {u['precision']:>10.3f} "
              f"{u['recall']:>7.3f}  {u['best_match'] if u['best_match'] >= 0 else '-'}")
    print(f"  well detected (accuracy >= 0.8): {s['well_detected']} / {s['n_true_units']}   mean accuracy "
          f"{s['mean_accuracy']:.3f}   sorted units {s['n_sorted_units']}   false-positive units "
          f"{s['false_positive_units']}   unassigned spikes {100 * s['unassigned_fraction']:.1f}%")
    if json_path:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _cmd_eval(args) -> int:
    _eval(args.spikes, args.truth, args.delta_ms, args.json)
    return 0


def _add_report(sub):
    p = sub.add_parser(
        "report", formatter_class=_Formatter,
        help="plots and an HTML page for a bundle or a spikes file",
        description="From a bundle: unit waveforms, unit positions on the probe, centroids in feature space "
                    "and the quality table with its flags. From a spikes file: ISI histograms with refractory "
                    "violations, firing rate and amplitude over time (add --bundle for both). Writes PNGs and "
                    "OUT/index.html.",
    )
    p.add_argument("target", type=Path, help="BUNDLE_DIR or SPIKES.npz")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--bundle", type=Path, help="with a spikes file: the bundle that sorted it")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from .report import write_report

    print(f"report: {write_report(args.target, args.out, args.bundle)}")
    return 0


def _add_phy(sub):
    p = sub.add_parser(
        "phy", formatter_class=_Formatter,
        help="export a sorting for manual curation in Phy",
        description="Write a Phy template-gui folder for SPIKES.npz (sorted by the bundle from the recording): "
                    "spike times, units as templates and clusters, trough amplitudes, the bundle's mean "
                    "waveforms, channel map and positions, cluster groups (flagged units 'mua', unassigned "
                    "spikes one 'noise' cluster) and one column per quality metric. Open it with "
                    "'phy template-gui OUT/params.py'; bring the curation back with 'rtsort curate'.",
    )
    p.add_argument("spikes", type=Path, help="SPIKES.npz from 'rtsort sort'")
    p.add_argument("--bundle", type=Path, required=True, help="the bundle that sorted it")
    p.add_argument("--recording", type=Path, required=True, help="the sorted recording (.bin + .json)")
    p.add_argument("--out", type=Path, required=True, help="Phy folder to write")
    p.set_defaults(func=_cmd_phy)


def _cmd_phy(args) -> int:
    from .bundle import load_bundle
    from .io import open_recording
    from .io.phy import export_phy
    from .io.spikes import load_spikes

    spikes, fs = load_spikes(args.spikes)
    b = load_bundle(args.bundle)
    rec = open_recording(args.recording)
    b.check_recording(rec)
    out = export_phy(spikes, fs, b, rec, args.out)
    print(f"{spikes.size} spikes, {b.n_units} units -> {out}; open with: phy template-gui {out / 'params.py'}")
    return 0


def _add_curate(sub):
    p = sub.add_parser(
        "curate", formatter_class=_Formatter,
        help="apply a Phy curation to a bundle",
        description="Read a Phy folder written by 'rtsort phy' and edited in Phy (merges, splits, moved spikes, "
                    "cluster groups), recompute the spikes' features with the bundle's own front end and "
                    "encoder, and write a new bundle whose centroids follow the curated clusters. Clusters "
                    "labelled 'noise' keep centroids that label their spikes -1. The unit table is recomputed.",
    )
    p.add_argument("bundle", type=Path, help="the bundle that was exported")
    p.add_argument("--phy", type=Path, required=True, help="the curated Phy folder")
    p.add_argument("--recording", type=Path, required=True, help="the recording that was sorted")
    p.add_argument("--out", type=Path, required=True, help="directory of the curated bundle")
    p.set_defaults(func=_cmd_curate)


def _cmd_curate(args) -> int:
    from .io import open_recording
    from .train.curate import apply_curation

    s = apply_curation(args.bundle, args.phy, open_recording(args.recording), args.out, progress=not args.quiet)
    print(f"{s['units_before']} units -> {s['units_after']} ({len(s['noise_clusters'])} noise clusters, "
          f"{s['centroids']} centroids, {100 * s['unassigned_fraction']:.1f} % of spikes unassigned) -> {args.out}")
    return 0


def _add_export(sub):
    p = sub.add_parser(
        "export", formatter_class=_Formatter,
        help="write a spikes file as NWB or as a SpikeInterface sorting",
        description="Write SPIKES.npz with its bundle's units as an NWB file (pynwb: electrodes with their "
                    "positions, a units table with spike times in seconds, peak electrode, mean waveform and "
                    "the quality metrics as columns; needs the 'export' extra) or as a SpikeInterface sorting "
                    "folder that spikeinterface.load reads (the unit table as unit properties; needs the "
                    "'interop' extra). Unassigned spikes (-1) are not units and are left out.",
    )
    p.add_argument("spikes", type=Path, help="SPIKES.npz from 'rtsort sort' or 'rtsort run'")
    p.add_argument("--bundle", type=Path, required=True, help="the bundle that sorted it")
    p.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "OUT"),
                   help="nwb OUT.nwb, or spikeinterface OUT_DIR")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .io.export import export_spikes

    to, out = args.to
    s = export_spikes(args.spikes, args.bundle, to, Path(out))
    print(f"{s['assigned']} of {s['spikes']} spikes in {s['units']} units -> {s['out']} ({to})")
    return 0


# ---------------------------------------------------------------- run / replay
def _add_run(sub):
    p = sub.add_parser(
        "run", formatter_class=_Formatter,
        help="sort a live stream with a bundle",
        description="Read chunks from a source, run the bundle's preprocessing, detector, encoder and "
                    "nearest-centroid labels causally, and emit labelled spikes to every sink. Sources: "
                    "file:PATH (a recording; --speed paces it), zmq:tcp://HOST:PORT (connects to a samples "
                    "publisher), lsl:NAME (an LSL stream). Sinks: file:SPIKES.npz (crash-safe log while running), "
                    "zmq:tcp://127.0.0.1:PORT (binds a PUB socket), lsl:NAME (a Markers outlet [unit, channel, "
                    "latency_us, confidence_permille, flags] stamped with each trough's LSL time).",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    p.add_argument("--source", required=True, help="file:PATH, zmq:tcp://HOST:PORT or lsl:NAME; "
                                                   "zmq:tcp://HOST:5556?format=openephys reads the Open Ephys GUI's "
                                                   "ZMQ Interface plugin")
    p.add_argument("--sink", action="append", default=[], help="file:SPIKES.npz, zmq:tcp://127.0.0.1:PORT or "
                                                               "lsl:NAME (repeatable); ?format=openephys on zmq: "
                                                               "Event Broadcaster spike messages; ?format=string "
                                                               "on lsl: the unit id as a text marker")
    p.add_argument("--duration", type=_positive_float, help="stop after this many seconds of samples")
    p.add_argument("--idle-timeout", type=_positive_float, help="stop after this many seconds without samples")
    p.add_argument("--chunk-ms", type=_positive_float, default=1.0, help="chunk length for file sources")
    p.add_argument("--speed", type=_positive_float, help="pace a file source at this multiple of real time")
    p.add_argument("--threads", type=_positive_int, default=1, help="onnxruntime threads")
    p.add_argument("--resolve-timeout", type=_positive_float, default=5.0, help="seconds to look for an LSL stream")
    p.add_argument("--max-lag-ms", type=float, default=50.0,
                   help="overload policy: chunks later than this are detected but not encoded (spikes leave as "
                        "-1, counted); 0 turns it off")
    p.add_argument("--track-rate", type=float, metavar="RATE",
                   help="let centroids follow slow drift (0-1; overrides the bundle's [assign] track_rate)")
    p.add_argument("--realtime", action="store_true",
                   help="ask for real-time scheduling (SCHED_FIFO; needs root, CAP_SYS_NICE or an rtprio limit; "
                        "a warning, not an error, when refused)")
    p.add_argument("--cpu", type=int, metavar="N",
                   help="pin the sorting loop to CPU N (keep other work off it: taskset, isolcpus)")
    p.add_argument("--watch-bundle", type=Path, metavar="DIR",
                   help="take over a curated bundle written to DIR (rtsort curate ... --out DIR) between two "
                        "chunks, without a restart or a lost sample: every spike from the logged cut sample on "
                        "carries its units (it must share the running bundle's preprocessing and detection)")
    p.add_argument("--stats", type=Path, help="write the run's statistics as JSON")
    p.add_argument("--stats-every", type=_positive_float, metavar="S",
                   help="with --stats: rewrite the file every S seconds while running (the statistics so far)")
    p.set_defaults(func=_cmd_run)


def _write_json(path: Path, data: dict) -> None:
    """Replace ``path`` whole (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _stop_on_signals():
    """SIGINT and SIGTERM stop the run cleanly (the chunk in hand is finished, the sinks closed, the stats
    written); a second signal interrupts at once. Returns the event they set and a function that puts the
    previous handlers back (handlers can only be set from the main thread: elsewhere, nothing is changed)."""
    import signal
    import threading

    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return stop, lambda: None

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("%s: stopping after this chunk", signal.Signals(signum).name)
        stop.set()

    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore():
        for sig, h in before.items():
            signal.signal(sig, h)
    return stop, restore


def _cmd_run(args) -> int:
    from .pipeline import raise_priority, run_stream

    if args.realtime:
        raise_priority()
    if args.stats_every and not args.stats:
        raise RtsortError("--stats-every needs --stats FILE.json")
    report = (lambda st: _write_json(args.stats, st)) if args.stats_every else None
    stop, restore = _stop_on_signals()
    try:
        stats = run_stream(args.bundle, args.source, args.sink, args.duration, args.idle_timeout, args.chunk_ms,
                           args.speed, args.threads, stop=stop, resolve_timeout=args.resolve_timeout,
                           max_lag_ms=args.max_lag_ms or None, track_rate=args.track_rate, report=report,
                           report_every_s=args.stats_every or 60.0, watch_bundle=args.watch_bundle,
                           cpu=args.cpu)
    finally:
        restore()
    c, lat = stats["compute_ms"], stats["trough_to_emit_ms"]
    print(f"{stats['chunks']} chunks, {stats['spikes']} spikes ({stats['unassigned']} unassigned, "
          f"{stats['skipped_encoding']} not encoded in {stats['late_chunks']} late chunks), "
          f"{stats['gaps']} gaps ({stats['gap_samples']} samples), malformed {stats['malformed'] or 0}")
    if c:
        print(f"compute per chunk: p50 {c['p50']:.3f}  p99 {c['p99']:.3f}  max {c['max']:.3f} ms")
    if lat:
        print(f"trough to emission: p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f} ms")
    bad = {k: stats[k] for k in ("nonfinite_samples", "saturated_samples", "flat_channel_s", "noisy_channel_s")
           if stats.get(k)}
    if bad:
        print("signal faults: " + ", ".join(f"{k} {v}" for k, v in bad.items()))
    if args.stats:
        _write_json(args.stats, stats)
    for sink, error in stats["sink_errors"].items():
        print(f"rtsort run: error: sink {sink}: {error}", file=sys.stderr)
    return 1 if stats["sink_errors"] else 0


def _add_recover(sub):
    p = sub.add_parser(
        "recover", formatter_class=_Formatter,
        help="turn a killed run's spike log into its spikes file",
        description="A file:SPIKES.npz sink appends every spike to SPIKES.npz.log as it leaves and writes "
                    "SPIKES.npz when the run ends. If the run was killed (kill -9, a crash, a power cut), the log "
                    "holds every spike emitted until then: this writes it as the spikes file, in trough order (a "
                    "record torn by the kill is dropped). The log is kept; a new run with the same sink also "
                    "recovers a stale log by itself, into SPIKES.recovered.npz.",
    )
    p.add_argument("log", type=Path, help="the spike log (SPIKES.npz.log)")
    p.add_argument("--out", type=Path, required=True, help="spikes file to write (.npz)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=_cmd_recover)


def _cmd_recover(args) -> int:
    from .io import load_spikes
    from .streams.files import recover_spike_file

    if args.out.exists() and not args.force:
        raise RtsortError(f"{args.out} exists; pass --force to overwrite it")
    recover_spike_file(args.log, args.out)
    spikes, fs = load_spikes(args.out)
    span = f", samples {spikes['sample_index'][0]}..{spikes['sample_index'][-1]}" if spikes.size else ""
    print(f"{spikes.size} spikes ({int(np.sum(spikes['unit'] < 0))} unassigned{span}) from {args.log} -> {args.out}")
    return 0


def _add_replay(sub):
    p = sub.add_parser(
        "replay", formatter_class=_Formatter,
        help="publish a recording as a live stream",
        description="Send a recording over ZeroMQ (wire format 'samples'; binds the address) or as an LSL "
                    "stream (float32 uV) in chunks, paced against an absolute clock so it never drifts, and "
                    "report the pacing error.",
    )
    _recording_arg(p)
    p.add_argument("--to", required=True, help="zmq:tcp://127.0.0.1:PORT or lsl:NAME")
    p.add_argument("--speed", type=_positive_float, default=1.0, help="multiple of real time")
    p.add_argument("--chunk-ms", type=_positive_float, default=1.0, help="chunk length in ms")
    p.add_argument("--loop", action="store_true", help="start over at the end (until --duration or Ctrl-C)")
    p.add_argument("--duration", type=_positive_float, help="seconds of samples to send")
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args) -> int:
    from .io import open_recording
    from .streams.replay import replay

    rec = open_recording(args.recording)
    try:
        stats = replay(rec, args.to, args.speed, args.chunk_ms, args.loop, args.duration)
    except KeyboardInterrupt:
        return 130
    e = stats["pacing_error_ms"]
    print(f"sent {stats['samples']} samples in {stats['chunks']} chunks; pacing error p50 {e['p50']:.3f} "
          f"p99 {e['p99']:.3f} max {e['max']:.3f} ms; dropped {stats['dropped']}")
    return 0


# ---------------------------------------------------------------- bench
def _add_bench(sub):
    p = sub.add_parser(
        "bench", formatter_class=_Formatter,
        help="measure per-chunk compute, end-to-end latency and throughput",
        description="Run the real pipeline over a grid of channel counts, chunk sizes and transports. inproc: "
                    "compute per chunk (total and per stage) and throughput; zmq / lsl: replay at 1x -> rtsort run "
                    "-> this process, trough-to-event latency. Without --bundle a recording and a small bundle are "
                    "simulated and trained once per channel count and cached ($RTSORT_CACHE, default "
                    "~/.cache/rtsort/bench). Run LSL benchmarks inside tools/loopback.sh on a machine without a "
                    "lab network.",
    )
    p.add_argument("--bundle", type=Path, help="benchmark this bundle (its channel count)")
    p.add_argument("--channels", type=_positive_int, nargs="+", default=[384], help="channel counts")
    p.add_argument("--sampling-rate", type=_positive_float, default=30000.0, help="Hz")
    p.add_argument("--chunk-ms", type=_positive_float, nargs="+", default=[1.0], help="chunk lengths in ms")
    p.add_argument("--transport", nargs="+", default=["inproc"], choices=["inproc", "zmq", "lsl"],
                   help="transports to measure")
    p.add_argument("--seconds", type=_positive_float,
                   help="seconds of data per configuration (default 10; with --accuracy the whole recording)")
    p.add_argument("--accuracy", type=Path, metavar="RECORDING_DIR",
                   help="accuracy against latency: replay this ground-truth recording (a folder with recording.bin "
                        "and truth.npz, as rtsort simulate writes) at 1x over each --transport (zmq or lsl; zmq if "
                        "none), sort it live, and score the events that reached this process within 1.5, 2, 3, 5 "
                        "and 10 ms of their trough, in chunks of the first --chunk-ms. Without --bundle one is trained "
                        "on the recording (cached)")
    p.add_argument("--json", type=Path, help="write every figure and the machine facts as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG: latency percentiles and where the time goes")
    p.add_argument("--realtime", action="store_true",
                   help="run the sorter of lsl/zmq configurations with 'rtsort run --realtime' (SCHED_FIFO)")
    p.add_argument("--headroom", type=_positive_int, metavar="MAX_CHANNELS",
                   help="also search, doubling from the smallest --channels up to MAX_CHANNELS, the largest channel "
                        "count that stays real time (throughput >= 1x and compute p99 < the chunk) per chunk size")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the same-run comparisons (detection vs SpikeInterface, onnxruntime vs torch)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from .bench import comparison_lines, markdown, plot, run_bench

    if args.accuracy is not None:
        return _bench_accuracy(args)
    report = run_bench(args.bundle, args.channels, args.sampling_rate, args.chunk_ms, args.transport,
                       args.seconds or 10.0,
                       progress=not args.quiet, compare=not args.no_compare, headroom_max=args.headroom,
                       realtime=args.realtime)
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores; numpy {m['numpy']}, numba {m['numba']}, onnxruntime "
          f"{m['onnxruntime']}")
    print(markdown(report))
    for line in comparison_lines(report):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, args.plot)
        print(f"plot -> {args.plot}")
    return 0


def _bench_accuracy(args) -> int:
    from .bench import accuracy_markdown, accuracy_vs_latency, machine_facts, plot_accuracy

    transports = [t for t in args.transport if t != "inproc"] or ["zmq"]
    rows = [accuracy_vs_latency(args.accuracy, args.bundle, t, args.chunk_ms[0], args.seconds, args.realtime,
                                progress=not args.quiet) for t in transports]
    for r in rows:
        e = r["trough_to_event_ms"]
        print(f"{r['transport']}: {r['events_scored']} events over {r['seconds']:.0f} s of {r['channels']} channels; "
              f"trough to event p50 {e.get('p50', float('nan')):.2f} p99 {e.get('p99', float('nan')):.2f} ms")
    print(accuracy_markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_facts(), "accuracy": rows}, indent=1) + "\n")
    if args.plot:
        plot_accuracy(rows, args.plot)
        print(f"plot -> {args.plot}")
    return 0


# ---------------------------------------------------------------- demo
def _add_demo(sub):
    p = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="simulate, train, sort and evaluate, end to end",
        description="End to end on built-in synthetic data: simulate a 32-channel ground-truth recording, train "
                    "a bundle on it, sort it with the runtime's pipeline, and score the result against the "
                    "truth with SpikeInterface's comparison.",
    )
    p.add_argument("--out", type=Path, default=Path("rtsort_demo"), help="output folder")
    p.add_argument("--duration", type=_positive_float, default=60.0, help="seconds to simulate")
    p.add_argument("--channels", type=_positive_int, default=32, help="number of channels")
    p.add_argument("--units", type=_positive_int, default=12, help="number of units")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .config import Config
    from .sim import simulate

    out = args.out
    t0 = time.perf_counter()
    print(f"[1/4] simulating {args.channels} channels, {args.units} units, {args.duration:g} s -> {out}")
    simulate(out, args.channels, args.units, args.duration, args.seed, progress=not args.quiet)
    print("[2/4] training a bundle (detect, snippets, Transformer autoencoder, ONNX, clustering, metrics)")
    _, result = _train(out / "recording.bin", out / "bundle", Config(), args.seed, args.quiet)
    print(f"      {len(result.units)} units, {result.timings['total_s']:.1f} s -> {out / 'bundle'}")
    _print_units(result.units)
    print("[3/4] sorting the recording with the runtime pipeline")
    _sort(out / "recording.bin", out / "bundle", out / "spikes.npz", 1.0, 1, args.quiet)
    print("[4/4] scoring against ground truth (SpikeInterface, 0.4 ms)")
    _eval(out / "spikes.npz", out / "truth.npz", 0.4, out / "accuracy.json")
    from .report import write_report

    index = write_report(out / "spikes.npz", out / "report", out / "bundle")
    print(f"done in {time.perf_counter() - t0:.0f} s: {out}/recording.bin, truth.npz, bundle/, spikes.npz, "
          f"accuracy.json; plots: {index}")
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
    _add_train(sub)
    _add_sort(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_phy(sub)
    _add_curate(sub)
    _add_export(sub)
    _add_batch(sub)
    _add_run(sub)
    _add_recover(sub)
    _add_replay(sub)
    _add_bench(sub)
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
