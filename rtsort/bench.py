"""``rtsort bench``: per-chunk compute, end-to-end latency and throughput of the real pipeline.

Without a bundle it simulates a recording of the requested size and trains a
small bundle for it, cached under ``$RTSORT_CACHE`` (default
``~/.cache/rtsort/bench``), so a newcomer gets figures with one command.
Transports: ``inproc`` (the file streamed through ``run_stream`` as fast as
it goes: compute per chunk and per stage, throughput); ``zmq`` and ``lsl``
(three processes: ``rtsort replay`` at 1x, ``rtsort run``, and this process
as the consumer of the labelled events: trough-to-event latency).
``--accuracy RECORDING_DIR`` (a recording with ``truth.npz``) replays that
recording the same way and scores, with SpikeInterface's comparison, the
events that reached the consumer within each of :data:`DEADLINES_MS` of their
trough (:func:`accuracy_vs_latency`): what a closed loop that must act by
then gets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .pipeline import STAGES, run_stream
from .stats import percentiles
from .types import FLAG_PEELED

log = logging.getLogger("rtsort.bench")
DEADLINES_MS = (1.5, 2.0, 3.0, 5.0, 10.0)


def cache_dir() -> Path:
    return Path(os.environ.get("RTSORT_CACHE", Path.home() / ".cache" / "rtsort" / "bench"))


def machine_facts() -> dict:
    import numba
    import onnxruntime

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
             "numba": numba.__version__, "onnxruntime": onnxruntime.__version__}
    for mod in ("pylsl", "zmq"):
        try:
            facts[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            facts[mod] = None
    return facts


def _simulation(folder: Path, n_channels: int, sampling_rate: float, seconds: float, progress: bool,
                positions_um=None) -> tuple[Path, bool]:
    """(recording, whether it was just written): a cached benchmark simulation at least 30 s long."""
    from .sim import simulate

    rec_path = folder / "recording.bin"
    duration = max(30.0, seconds)
    if rec_path.exists() and rec_path.stat().st_size >= int(duration * sampling_rate) * n_channels * 2:  # int16
        return rec_path, False
    log.info("simulating %g s on %d channels in %s (cached)", duration, n_channels, folder)
    simulate(folder, n_channels, max(2, n_channels // 4), duration, seed=11, sampling_rate=sampling_rate,
             progress=progress, positions_um=positions_um)
    return rec_path, True


def bench_recording(bundle: Path, seconds: float, progress: bool = True) -> Path:
    """A simulated recording on a bundle's own probe and rate (cached per bundle), to run that bundle over."""
    from .bundle import load_bundle

    b = load_bundle(bundle)
    key = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()[:16]
    return _simulation(cache_dir() / f"for_bundle_{key}", b.n_channels, b.sampling_rate, seconds, progress,
                       b.probe.positions_um)[0]


def bench_data(n_channels: int, sampling_rate: float, seconds: float, progress: bool = True) -> tuple[Path, Path]:
    """(recording, bundle) for a channel count: simulated and trained once, then cached.

    A cached bundle trained from another recording, or with other defaults
    (another rtsort version), is trained again.
    """
    from .config import Config

    folder = cache_dir() / f"{n_channels}ch_{sampling_rate:g}Hz"
    bundle = folder / "bundle"
    rec_path, fresh = _simulation(folder, n_channels, sampling_rate, seconds, progress)
    cfg = Config.from_dict({"train": {"epochs": 5, "max_snippets": 4000}})
    manifest = bundle / "manifest.json"
    if fresh or not manifest.exists() or json.loads(manifest.read_text()).get("config") != cfg.to_dict():
        from .io import open_recording
        from .train import train_bundle

        log.info("training the %d-channel benchmark bundle in %s (cached)", n_channels, bundle)
        train_bundle(open_recording(rec_path), bundle, cfg, seed=0, progress=progress)
    return rec_path, bundle


class _ZmqConsumer:
    def __init__(self, address: str):
        import zmq

        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(address)

    def consume(self, runner, lat: list, stamps: list, flags: list) -> int:
        from .streams.replay import now
        from .streams.zmq import decode_spikes

        n = 0
        while True:
            if self.sub.poll(100):
                s = decode_spikes(self.sub.recv_multipart())
                lat.extend((now() - s["timestamp"]).tolist())
                stamps.extend(zip(s["timestamp"].tolist(), s["channel"].tolist(), s["unit"].tolist()))
                flags.extend(s["flags"].tolist())
                n += s.size
            elif runner.poll() is not None:  # the runner has exited and nothing is left in flight
                break
        self.sub.close(0)
        return n


class _LslConsumer:
    def __init__(self, name: str):
        import pylsl

        info = pylsl.resolve_byprop("name", name, timeout=60)
        if not info:
            raise RuntimeError(f"the marker outlet lsl:{name} did not appear")
        # one host, one clock: the markers' stamps are used as sent (clock sync would only add its estimate's error)
        self.inlet = pylsl.StreamInlet(info[0])
        self.inlet.open_stream(timeout=10)

    def consume(self, runner, lat: list, stamps: list, flags: list) -> int:
        import pylsl

        n = 0
        while runner.poll() is None:
            x, ts = self.inlet.pull_chunk(timeout=0.1, max_samples=4096, as_numpy=True, min_samples=1)
            if len(ts):
                lat.extend(pylsl.local_clock() - ts)
                # MARKER_CHANNELS: unit, peak_channel, latency_us, confidence_permille, flags
                stamps.extend(zip(ts.tolist(), x[:, 1].tolist(), x[:, 0].tolist()))
                flags.extend(x[:, 4].tolist())
                n += len(ts)
        self.inlet.close_stream()
        return n


def end_to_end(recording: Path, bundle: Path, transport: str, chunk_ms: float, seconds: float,
               realtime: bool = False, events: Path | None = None) -> dict:
    """Replay at 1x -> rtsort run -> this process; trough-to-event latency of every labelled spike.

    ``events``: also keep the run's spikes file there, each spike with the latency at which this process
    received it (``consumer_latency_ms``; NaN: never received).
    """
    from socket import socket

    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    if transport == "zmq":
        ports = []
        for _ in range(2):
            with socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        src, dst = f"zmq:tcp://127.0.0.1:{ports[0]}", f"zmq:tcp://127.0.0.1:{ports[1]}"
    else:
        src, dst = f"lsl:bench-src-{tag}", f"lsl:bench-events-{tag}"
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", "rtsort", "-q"]
        live = Path(tmp) / "live.npz"
        runner = subprocess.Popen(cmd + ["run", "--bundle", str(bundle), "--source", src, "--sink", dst,
                                         "--idle-timeout", "2", "--resolve-timeout", "30", "--stats",
                                         str(stats_file)] + (["--realtime"] if realtime else []) +
                                  (["--sink", f"file:{live}"] if events is not None else []),
                                  stdout=subprocess.DEVNULL)
        # the consumer is connected to rtsort's sink before the first sample is sent
        consumer = _ZmqConsumer(dst[4:]) if transport == "zmq" else _LslConsumer(dst[4:])
        time.sleep(1.0)  # subscriptions propagate (ZeroMQ's slow joiner); rtsort is warm
        sender = subprocess.Popen(cmd + ["replay", str(recording), "--to", src, "--chunk-ms", str(chunk_ms),
                                         "--duration", str(seconds)], stdout=subprocess.PIPE, text=True)
        lat: list = []
        stamps: list = []
        flags: list = []
        n = consumer.consume(runner, lat, stamps, flags)
        out, _ = sender.communicate(timeout=60)
        runner.wait(60)
        run = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        lat_ms = np.asarray(lat) * 1000.0
        if events is not None:
            _received_at(live, events, stamps, lat_ms)
    later = (np.asarray(flags, np.int64) & FLAG_PEELED) > 0
    return {
        "events_received": int(n),
        "trough_to_event_ms": percentiles(lat_ms),
        # the spikes of the first pass (not peeled: what leaves with its chunk), and the peeled ones, at the consumer
        "first_pass_trough_to_event_ms": percentiles(lat_ms[~later]),
        "peeled_trough_to_event_ms": percentiles(lat_ms[later]),
        "wait_ms": run.get("wait_ms", {}),  # trough -> end of the chunk that completed its snippet
        "arrival_ms": run.get("arrival_ms", {}),  # a chunk's last sample taken -> chunk read by rtsort
        "emitted_ms": run.get("trough_to_emit_ms", {}),  # trough -> sent by rtsort (wait, transport in, compute)
        "peeled": run.get("peeled", 0),  # collisions and matches found in the residual: they leave later (rtsort.peel)
        "peeled_wait_ms": run.get("peeled_wait_ms", {}),
        "peeled_emitted_ms": run.get("peeled_trough_to_emit_ms", {}),
        "compute_ms": run.get("compute_ms", {}),
        "stage_ms": {**run.get("stage_ms", {}), "sink": run.get("sink_ms", {})},  # per chunk, in the sorter
        "samples": run.get("samples", 0),
        "gaps": run.get("gaps", 0),
        "gap_samples": run.get("gap_samples", 0),
        "late_chunks": run.get("late_chunks", 0),
        "skipped_encoding": run.get("skipped_encoding", 0),
        "dropped": run.get("dropped_by_sinks", 0),
        "replay": out.strip(),
    }


def _received_at(live: Path, out: Path, received: list, lat_ms: np.ndarray) -> None:
    """The run's spikes file, each spike with the consumer's latency (NaN: not received): matched by (trough time,
    channel, unit), which every transport carries as sent."""
    with np.load(live) as f:
        data = {k: f[k] for k in f.files}
    arrived: dict = {}
    for key, lat in zip(received, lat_ms.tolist()):
        arrived.setdefault(key, []).append(lat)
    got = np.full(data["timestamp"].size, np.nan, np.float32)
    for i, key in enumerate(zip(data["timestamp"].tolist(), data["channel"].tolist(), data["unit"].tolist())):
        lats = arrived.get(key)
        if lats:
            got[i] = lats.pop(0)
    np.savez(out, **data, consumer_latency_ms=got)


def accuracy_vs_latency(recording_dir: Path, bundle: Path | None, transport: str, chunk_ms: float,
                        seconds: float | None, realtime: bool = False, progress: bool = True) -> dict:
    """Replay a ground-truth recording at 1x through ``transport``, sort it live, and score the events that
    reached this process within each deadline of :data:`DEADLINES_MS` (later ones count as missed).

    Without ``bundle`` one is trained on the recording itself (default configuration, seed 0; cached).
    """
    from .errors import RecordingError
    from .evaluate import sorting_accuracy
    from .io import open_recording

    recording_dir = Path(recording_dir)
    rec_path, truth_path = recording_dir / "recording.bin", recording_dir / "truth.npz"
    for p in (rec_path, truth_path):
        if not p.exists():
            raise RecordingError(f"{recording_dir}: --accuracy needs a recording folder with {p.name} "
                                 "(rtsort simulate writes one)")
    rec = open_recording(rec_path)
    if bundle is None:
        from .config import Config
        from .train import train_bundle

        key = hashlib.sha256(str(rec_path.resolve()).encode()).hexdigest()[:16]
        bundle = cache_dir() / f"accuracy_{key}" / "bundle"
        if not (bundle / "manifest.json").exists() or \
                (bundle / "manifest.json").stat().st_mtime < rec_path.stat().st_mtime:
            log.info("training a bundle on %s (cached in %s)", rec_path, bundle)
            train_bundle(rec, bundle, Config(), seed=0, progress=progress)
    seconds = rec.n_samples / rec.sampling_rate if seconds is None else min(seconds, rec.n_samples / rec.sampling_rate)
    with tempfile.TemporaryDirectory() as tmp:
        events = Path(tmp) / "events.npz"
        row = end_to_end(rec_path, Path(bundle), transport, chunk_ms, seconds, realtime, events=events)
        with np.load(events) as f:
            idx, unit, got = f["sample_index"], f["unit"], f["consumer_latency_ms"]
    truth = np.load(truth_path)
    n = int(round(seconds * rec.sampling_rate))
    # the samples the run saw: the replay's first messages may go out before rtsort's subscription has reached it
    # (ZeroMQ's slow joiner; counted as the run's missing samples), and spikes of the last 10 ms may not be
    # complete when the replay stops
    margin = int(0.01 * rec.sampling_rate)
    first = max(0, n - int(row.get("samples", 0)) - int(row.get("gap_samples", 0)))
    last = n - margin
    t_keep = (truth["sample_index"] >= first + margin) & (truth["sample_index"] < last)
    ti, tu = truth["sample_index"][t_keep], truth["unit"][t_keep]
    keep = (idx >= first + margin) & (idx < last)
    idx, unit, got = idx[keep], unit[keep], got[keep]
    by_deadline = []
    for d in DEADLINES_MS + (np.inf,):
        ok = got <= d
        s = sorting_accuracy(idx[ok], unit[ok], ti, tu, rec.sampling_rate)["summary"]
        by_deadline.append({"within_ms": None if np.isinf(d) else d, "events": float(ok.mean()) if ok.size else 0.0,
                            "well_detected": s["well_detected"], "n_true_units": s["n_true_units"],
                            "mean_accuracy": s["mean_accuracy"], "false_positive_units": s["false_positive_units"]})
    edges = np.arange(0.0, 20.25, 0.25)
    hist, _ = np.histogram(got[np.isfinite(got)], bins=edges)
    row.update({"recording": str(recording_dir), "bundle": str(bundle), "transport": transport, "chunk_ms": chunk_ms,
                "seconds": seconds, "scored_samples": [first, last], "channels": rec.n_channels,
                "events_scored": int(idx.size),
                "never_received": int(np.count_nonzero(~np.isfinite(got))),
                "accuracy_by_deadline": by_deadline,
                "latency_histogram": {"edges_ms": edges.tolist(), "counts": hist.tolist(),
                                      "over_20_ms": int(np.count_nonzero(got > edges[-1]))}})
    return row


def accuracy_markdown(rows: list) -> str:
    lines = ["| transport | events by then | well detected | mean accuracy | false-positive units | deadline |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        for d in r["accuracy_by_deadline"]:
            when = "any time" if d["within_ms"] is None else f"{d['within_ms']:g} ms"
            lines.append(f"| {r['transport']} | {d['events']:.3f} | {d['well_detected']}/{d['n_true_units']} | "
                         f"{d['mean_accuracy']:.3f} | {d['false_positive_units']} | {when} |")
    return "\n".join(lines)


def plot_accuracy(rows: list, path: Path) -> None:
    from .report import pyplot, save_figure

    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(10, 4))
    for i, r in enumerate(rows):
        d = [x for x in r["accuracy_by_deadline"] if x["within_ms"] is not None]
        a1.plot([x["within_ms"] for x in d], [x["mean_accuracy"] for x in d], "o-", color=f"C{i}",
                label=f"{r['transport']}: mean accuracy")
        a1.plot([x["within_ms"] for x in d], [x["events"] for x in d], "s--", color=f"C{i}", alpha=0.6,
                label=f"{r['transport']}: share of events")
        h = r["latency_histogram"]
        a2.stairs(h["counts"], h["edges_ms"], label=r["transport"], color=f"C{i}")
    a1.set_xscale("log")
    a1.set_xticks(DEADLINES_MS, [f"{d:g}" for d in DEADLINES_MS])
    a1.minorticks_off()
    a1.set_xlabel("deadline after the trough (ms)")
    a1.set_ylim(0, 1.02)
    a1.set_title("what a closed loop acting by then gets")
    a1.legend(fontsize=8)
    a2.set_xlabel("trough to event at the consumer (ms)")
    a2.set_ylabel("events")
    a2.set_title("latency")
    a2.legend(fontsize=8)
    save_figure(fig, path)


def in_process(recording: Path, bundle: Path, chunk_ms: float, seconds: float) -> dict:
    t0 = time.perf_counter()
    st = run_stream(bundle, f"file:{recording}", [], duration=seconds, chunk_ms=chunk_ms)
    wall = time.perf_counter() - t0
    fs = json.loads((bundle / "manifest.json").read_text())["sampling_rate"]
    data_s = st["samples"] / fs
    return {"compute_ms": st["compute_ms"], "stage_ms": st["stage_ms"], "wait_ms": st["wait_ms"],
            "peeled": st["peeled"], "peeled_wait_ms": st["peeled_wait_ms"],
            "chunks": st["chunks"], "spikes": st["spikes"], "spikes_per_s": st["spikes"] / data_s,
            "x_real_time": data_s / st["compute_s_total"] if st["compute_s_total"] > 0 else 0.0,
            "wall_s": wall, "late_chunks": st["late_chunks"], "dropped": 0}


def detect_spikeinterface(raw, recording) -> dict:
    """SpikeInterface's bandpass + median reference + detect_peaks(locally_exclusive), n_jobs=1, in memory."""
    import spikeinterface.preprocessing as spre
    from spikeinterface.core import NumpyRecording, get_noise_levels
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks

    uV = raw.astype("float32") * np.asarray(recording.gains_to_uV, "float32") + \
        np.asarray(recording.offsets_to_uV, "float32")
    mem = NumpyRecording([uV], recording.sampling_rate)
    mem.set_dummy_probe_from_locations(recording.probe.positions_um)
    pp = spre.common_reference(spre.bandpass_filter(mem, freq_min=300.0, freq_max=6000.0),
                               reference="global", operator="median")
    noise = get_noise_levels(pp, return_in_uV=False, seed=0, progress_bar=False)
    t0 = time.perf_counter()
    peaks = detect_peaks(pp, method="locally_exclusive", method_kwargs=dict(noise_levels=noise),
                         job_kwargs=dict(n_jobs=1, chunk_duration="1s", progress_bar=False))
    dt = time.perf_counter() - t0
    return {"wall_s": dt, "x_real_time": raw.shape[0] / recording.sampling_rate / dt, "n_events": int(peaks.size)}


def detect_rtsort(raw, recording, chunk_s: float = 1.0) -> dict:
    """rtsort's preprocessing + detector over the same samples, streamed in ``chunk_s`` chunks, one thread."""
    from .config import Config
    from .frontend import FrontEnd

    fe = FrontEnd.for_recording(Config(), recording, snippets=False)
    fe.calibrate(recording)
    fe.warmup()
    step = max(1, int(chunk_s * recording.sampling_rate))
    n = 0
    t0 = time.perf_counter()
    for s in range(0, raw.shape[0], step):
        n += fe.process(raw[s:s + step]).events.size
    dt = time.perf_counter() - t0
    return {"wall_s": dt, "x_real_time": raw.shape[0] / recording.sampling_rate / dt, "n_events": int(n)}


def compare_detection(recording_path: Path, seconds: float) -> dict:
    """The detection stage against SpikeInterface's detect_peaks on the same samples, in the same run."""
    from .io import open_recording

    rec = open_recording(recording_path)
    raw = np.asarray(rec.get_traces(0, int(seconds * rec.sampling_rate)))
    out = {"rtsort": detect_rtsort(raw, rec)}
    try:
        out["spikeinterface_locally_exclusive"] = detect_spikeinterface(raw, rec)
        out["speedup"] = out["rtsort"]["x_real_time"] / out["spikeinterface_locally_exclusive"]["x_real_time"]
    except ImportError:
        out["spikeinterface_locally_exclusive"] = None  # the interop extra is not installed
    return out


def encoder_costs(encoder_path: Path, train_cfg=None, batch: int = 32, repeat: int = 200) -> dict:
    """us per spike of an ONNX encoder in onnxruntime and, given its [train] shape and torch, of the same
    architecture in torch (untrained: the cost does not depend on the weights), one thread each."""
    from .features import Encoder

    enc = Encoder(encoder_path, threads=1)
    t, k = enc.input_shape
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, t, k)).astype(np.float32)
    p = rng.normal(size=(batch, k, 2)).astype(np.float32) * 20

    def per_spike(fn) -> float:
        for _ in range(20):
            fn()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t0) / repeat / batch * 1e6

    out = {"batch": batch, "onnxruntime_us_per_spike": per_spike(lambda: enc(x, p)), "torch_us_per_spike": None}
    try:
        import torch

        from .train.model import SpikeEncoder
    except ImportError:  # the train extra is not installed
        return out
    if train_cfg is None:
        return out
    model = SpikeEncoder(t, k, train_cfg.latent_dim, train_cfg.d_model, train_cfg.n_layers, train_cfg.n_heads,
                         linear_path=train_cfg.linear_path).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    xt, pt = torch.from_numpy(x), torch.from_numpy(p)
    with torch.no_grad():
        out["torch_us_per_spike"] = per_spike(lambda: model(xt, pt))
    torch.set_num_threads(threads)
    out["speedup"] = out["torch_us_per_spike"] / out["onnxruntime_us_per_spike"]
    return out


def compare_encoder(bundle: Path, batch: int = 32) -> dict:
    """onnxruntime on the bundle's encoder against the same architecture in torch."""
    from .bundle import load_bundle

    b = load_bundle(bundle)
    return encoder_costs(b.encoder_path, b.config.train, batch)


def headroom(channels_from: int, channels_max: int, sampling_rate: float, chunk_ms: float, seconds: float,
             progress: bool = True) -> dict:
    """The largest channel count (doubling from ``channels_from``) that stays real time at this chunk size.

    Real time here means both: throughput above 1x, and the p99 compute per
    chunk below the chunk's duration (a chunk must be done before the next).
    """
    tried = []
    best = None
    c = int(channels_from)
    while c <= channels_max:
        rec, b = bench_data(c, sampling_rate, seconds, progress)
        r = in_process(rec, b, chunk_ms, seconds)
        ok = r["x_real_time"] >= 1.0 and r["compute_ms"]["p99"] < chunk_ms
        tried.append({"channels": c, "x_real_time": r["x_real_time"], "compute_p99_ms": r["compute_ms"]["p99"],
                      "real_time": ok})
        if not ok:
            break
        best = c
        c *= 2
    return {"chunk_ms": chunk_ms, "largest_real_time_channels": best, "tried": tried,
            "criterion": "throughput >= 1x and compute p99 < chunk duration"}


def run_bench(bundle: Path | None = None, channels=(384,), sampling_rate: float = 30000.0, chunk_ms=(1.0,),
              transports=("inproc",), seconds: float = 10.0, progress: bool = True, compare: bool = True,
              headroom_max: int | None = None, realtime: bool = False) -> dict:
    results, comparisons = [], []
    for c in channels:
        if bundle is None:
            rec, b = bench_data(c, sampling_rate, seconds, progress)
        else:
            b = Path(bundle)
            rec = bench_recording(b, seconds, progress)
            manifest = json.loads((b / "manifest.json").read_text())
            c, sampling_rate = manifest["n_channels"], manifest["sampling_rate"]
        for ms in chunk_ms:
            for tr in transports:
                log.info("bench: %d channels, %g ms chunks, %s", c, ms, tr)
                row = {"channels": c, "sampling_rate": sampling_rate, "chunk_ms": ms, "transport": tr}
                row.update(in_process(rec, b, ms, seconds) if tr == "inproc" else
                           end_to_end(rec, b, tr, ms, seconds, realtime))
                row["realtime_scheduling"] = bool(realtime and tr != "inproc")
                results.append(row)
        if compare:
            log.info("bench: comparisons at %d channels", c)
            comparisons.append({"channels": c, "detection": compare_detection(rec, min(seconds, 10.0)),
                                "encoder": compare_encoder(b)})
    report = {"machine": machine_facts(), "seconds": seconds, "results": results, "comparisons": comparisons}
    if headroom_max:
        report["headroom"] = [headroom(min(channels), headroom_max, sampling_rate, ms, seconds, progress)
                              for ms in chunk_ms]
    return report


def markdown(report: dict) -> str:
    lines = ["| channels | chunk | transport | compute p50 | p99 | p99.9 | max | x real time | "
             "trough->event p50 | p99 | first pass p99 | of which wait p50 | sent p50 |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        c = r.get("compute_ms", {})
        e = r.get("trough_to_event_ms", {})
        w, s = (r.get("wait_ms", {}), r.get("emitted_ms", {})) if e else ({}, {})
        rt = " (realtime)" if r.get("realtime_scheduling") else ""
        f = lambda d, k: f"{d[k]:.3f} ms" if k in d else "-"  # noqa: E731
        x = f"{r['x_real_time']:.1f}" if "x_real_time" in r else "-"
        lines.append(f"| {r['channels']} | {r['chunk_ms']:g} ms | {r['transport']}{rt} | {f(c, 'p50')} | {f(c, 'p99')} | "
                     f"{f(c, 'p99.9')} | {f(c, 'max')} | {x} | {f(e, 'p50')} | {f(e, 'p99')} | "
                     f"{f(r.get('first_pass_trough_to_event_ms', {}), 'p99')} | {f(w, 'p50')} | "
                     f"{f(s, 'p50')} |")
    for r in report["results"]:
        if r.get("peeled"):
            w, s = r.get("peeled_wait_ms", {}), r.get("peeled_emitted_ms", {})
            sent = f", sent p50 {s['p50']:.3f} ms" if "p50" in s else ""
            lines.append(f"{r['channels']} ch {r['transport']}: {r['peeled']} peeled spikes (collisions "
                         f"and matches, leave later): wait p50 {w.get('p50', float('nan')):.3f} ms, p99 "
                         f"{w.get('p99', float('nan')):.3f} ms{sent}")
    return "\n".join(lines)


def comparison_lines(report: dict) -> list:
    lines = []
    for c in report.get("comparisons", []):
        d, e = c["detection"], c["encoder"]
        si = d.get("spikeinterface_locally_exclusive")
        det = f"detection stage {d['rtsort']['x_real_time']:.1f}x real time"
        det += (f" vs SpikeInterface detect_peaks {si['x_real_time']:.1f}x (speedup {d['speedup']:.1f})" if si
                else " (SpikeInterface not installed)")
        enc = f"encoder {e['onnxruntime_us_per_spike']:.1f} us/spike in onnxruntime at batch {e['batch']}"
        enc += (f" vs {e['torch_us_per_spike']:.1f} in torch (speedup {e['speedup']:.1f})"
                if e.get("torch_us_per_spike") else " (torch not installed)")
        lines.append(f"{c['channels']} ch, same run: {det}; {enc}")
    for h in report.get("headroom", []):
        steps = ", ".join(f"{t['channels']} ch {t['x_real_time']:.1f}x p99 {t['compute_p99_ms']:.2f} ms"
                          for t in h["tried"])
        lines.append(f"headroom at {h['chunk_ms']:g} ms chunks: largest real-time channel count "
                     f"{h['largest_real_time_channels']} ({steps})")
    return lines


def plot(report: dict, path: Path) -> None:
    from .report import pyplot, save_figure

    rows = report["results"]
    labels = [f"{r['channels']} ch\n{r['chunk_ms']:g} ms\n{r['transport']}" for r in rows]
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(max(8, 2.2 * len(rows)), 4.5))
    qs = ("p50", "p90", "p99", "p99.9", "max")
    for i, r in enumerate(rows):
        d = r.get("trough_to_event_ms") or r.get("compute_ms", {})
        a1.plot([i] * len(qs), [d.get(q, np.nan) for q in qs], "o-", color="C0" if "trough_to_event_ms" not in r
                else "C1")
        for q in qs:
            if q in d:
                a1.annotate(q, (i, d[q]), textcoords="offset points", xytext=(6, -3), fontsize=7)
    a1.set_yscale("log")
    a1.set_xticks(range(len(rows)), labels, fontsize=8)
    a1.set_ylabel("ms (blue: compute per chunk; orange: trough to event)")
    a1.set_title("latency percentiles")
    bottom = np.zeros(len(rows))
    for j, stage in enumerate(STAGES + ("sink",)):
        v = np.array([r.get("stage_ms", {}).get(stage, {}).get("mean", 0.0) for r in rows])
        a2.bar(range(len(rows)), v, bottom=bottom, label=stage, color=f"C{j}")
        bottom += v
    a2.set_xticks(range(len(rows)), labels, fontsize=8)
    a2.set_ylabel("ms per chunk (mean of each stage)")
    a2.set_title("where the time goes (in the sorter)")
    a2.legend(fontsize=8)
    save_figure(fig, path)
