"""``rtsort bench``: per-chunk compute, end-to-end latency and throughput of the real pipeline.

Without a bundle it simulates a recording of the requested size and trains a
small bundle for it, cached under ``$RTSORT_CACHE`` (default
``~/.cache/rtsort/bench``), so a newcomer gets figures with one command.
Transports: ``inproc`` (the file streamed through ``run_stream`` as fast as
it goes: compute per chunk and per stage, throughput); ``zmq`` and ``lsl``
(three processes: ``rtsort replay`` at 1x, ``rtsort run``, and this process
as the consumer of the labelled events: trough-to-event latency).
"""

from __future__ import annotations

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

log = logging.getLogger("rtsort.bench")


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


def bench_data(n_channels: int, sampling_rate: float, seconds: float, progress: bool = True) -> tuple[Path, Path]:
    """(recording, bundle) for a channel count: simulated and trained once, then cached."""
    from .config import Config
    from .sim import simulate

    folder = cache_dir() / f"{n_channels}ch_{sampling_rate:g}Hz"
    rec_path, bundle = folder / "recording.bin", folder / "bundle"
    duration = max(30.0, seconds)
    ok = (bundle / "manifest.json").exists() and rec_path.exists() and \
        rec_path.stat().st_size >= int(duration * sampling_rate) * n_channels * 2
    if not ok:
        from .train import train_bundle

        log.info("building a %d-channel benchmark recording and bundle in %s (cached)", n_channels, folder)
        rec = simulate(folder, n_channels, max(2, n_channels // 4), duration, seed=11, sampling_rate=sampling_rate,
                       progress=progress)
        cfg = Config.from_dict({"train": {"epochs": 5, "max_snippets": 4000}})
        train_bundle(rec, bundle, cfg, seed=0, progress=progress)
    return rec_path, bundle


class _ZmqConsumer:
    def __init__(self, address: str):
        import zmq

        self.sub = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(address)

    def consume(self, runner, lat: list) -> int:
        from .streams.replay import now
        from .streams.zmq import decode_spikes

        n = 0
        while runner.poll() is None or self.sub.poll(100):
            if self.sub.poll(100):
                s = decode_spikes(self.sub.recv_multipart())
                lat.extend((now() - s["timestamp"]).tolist())
                n += s.size
        self.sub.close(0)
        return n


class _LslConsumer:
    def __init__(self, name: str):
        import pylsl

        info = pylsl.resolve_byprop("name", name, timeout=60)
        if not info:
            raise RuntimeError(f"the marker outlet lsl:{name} did not appear")
        self.inlet = pylsl.StreamInlet(info[0], processing_flags=pylsl.proc_clocksync)
        self.inlet.open_stream(timeout=10)
        self.inlet.time_correction(timeout=10)  # the first clock-sync estimate, before any marker

    def consume(self, runner, lat: list) -> int:
        import pylsl

        n = 0
        while runner.poll() is None:
            _, ts = self.inlet.pull_chunk(timeout=0.1, max_samples=4096, as_numpy=True, min_samples=1)
            if len(ts):
                lat.extend(pylsl.local_clock() - ts)
                n += len(ts)
        self.inlet.close_stream()
        return n


def end_to_end(recording: Path, bundle: Path, transport: str, chunk_ms: float, seconds: float) -> dict:
    """Replay at 1x -> rtsort run -> this process; trough-to-event latency of every labelled spike."""
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
        runner = subprocess.Popen(cmd + ["run", "--bundle", str(bundle), "--source", src, "--sink", dst,
                                         "--idle-timeout", "2", "--resolve-timeout", "30", "--stats",
                                         str(stats_file)], stdout=subprocess.DEVNULL)
        # the consumer is connected to rtsort's sink before the first sample is sent
        consumer = _ZmqConsumer(dst[4:]) if transport == "zmq" else _LslConsumer(dst[4:])
        time.sleep(1.0)  # subscriptions propagate (ZeroMQ's slow joiner); rtsort is warm
        sender = subprocess.Popen(cmd + ["replay", str(recording), "--to", src, "--chunk-ms", str(chunk_ms),
                                         "--duration", str(seconds)], stdout=subprocess.PIPE, text=True)
        lat: list = []
        n = consumer.consume(runner, lat)
        out, _ = sender.communicate(timeout=60)
        runner.wait(60)
        run = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    lat_ms = np.asarray(lat) * 1000.0
    return {
        "events_received": int(n),
        "trough_to_event_ms": _pct(lat_ms),
        "wait_ms": run.get("wait_ms", {}),
        "compute_ms": run.get("compute_ms", {}),
        "samples": run.get("samples", 0),
        "gaps": run.get("gaps", 0),
        "gap_samples": run.get("gap_samples", 0),
        "late_chunks": run.get("late_chunks", 0),
        "skipped_encoding": run.get("skipped_encoding", 0),
        "dropped": run.get("dropped_by_sinks", 0),
        "replay": out.strip(),
    }


def _pct(v) -> dict:
    v = np.asarray(v, dtype=np.float64)
    if v.size == 0:
        return {}
    return {k: float(np.percentile(v, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9),
                                                       ("max", 100))}


def in_process(recording: Path, bundle: Path, chunk_ms: float, seconds: float) -> dict:
    t0 = time.perf_counter()
    st = run_stream(bundle, f"file:{recording}", [], duration=seconds, chunk_ms=chunk_ms)
    wall = time.perf_counter() - t0
    fs = json.loads((bundle / "manifest.json").read_text())["sampling_rate"]
    data_s = st["samples"] / fs
    return {"compute_ms": st["compute_ms"], "stage_ms": st["stage_ms"], "wait_ms": st["wait_ms"],
            "chunks": st["chunks"], "spikes": st["spikes"], "spikes_per_s": st["spikes"] / data_s,
            "x_real_time": data_s / st["compute_s_total"] if st["compute_s_total"] > 0 else 0.0,
            "wall_s": wall, "late_chunks": st["late_chunks"], "dropped": 0}


def run_bench(bundle: Path | None = None, channels=(384,), sampling_rate: float = 30000.0, chunk_ms=(1.0,),
              transports=("inproc",), seconds: float = 10.0, progress: bool = True) -> dict:
    results = []
    for c in channels:
        if bundle is None:
            rec, b = bench_data(c, sampling_rate, seconds, progress)
        else:
            b = Path(bundle)
            manifest = json.loads((b / "manifest.json").read_text())
            rec, _ = bench_data(manifest["n_channels"], manifest["sampling_rate"], seconds, progress)
            c = manifest["n_channels"]
        for ms in chunk_ms:
            for tr in transports:
                log.info("bench: %d channels, %g ms chunks, %s", c, ms, tr)
                row = {"channels": c, "sampling_rate": sampling_rate, "chunk_ms": ms, "transport": tr}
                row.update(in_process(rec, b, ms, seconds) if tr == "inproc" else end_to_end(rec, b, tr, ms, seconds))
                results.append(row)
    return {"machine": machine_facts(), "seconds": seconds, "results": results}


def markdown(report: dict) -> str:
    lines = ["| channels | chunk | transport | compute p50 | p99 | p99.9 | max | x real time | trough->event p50 | p99 |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        c = r.get("compute_ms", {})
        e = r.get("trough_to_event_ms", {})
        f = lambda d, k: f"{d[k]:.3f} ms" if k in d else "-"  # noqa: E731
        x = f"{r['x_real_time']:.1f}" if "x_real_time" in r else "-"
        lines.append(f"| {r['channels']} | {r['chunk_ms']:g} ms | {r['transport']} | {f(c, 'p50')} | {f(c, 'p99')} | "
                     f"{f(c, 'p99.9')} | {f(c, 'max')} | {x} | {f(e, 'p50')} | {f(e, 'p99')} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['channels']} ch\n{r['chunk_ms']:g} ms\n{r['transport']}" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows)), 4.5))
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
    for j, stage in enumerate(STAGES):
        v = np.array([r.get("stage_ms", {}).get(stage, {}).get("mean", 0.0) for r in rows])
        a2.bar(range(len(rows)), v, bottom=bottom, label=stage, color=f"C{j}")
        bottom += v
    a2.set_xticks(range(len(rows)), labels, fontsize=8)
    a2.set_ylabel("ms per chunk (mean of each stage)")
    a2.set_title("where the time goes (in process)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
