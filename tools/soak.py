"""Soak test: hours of a live run, measured every minute.

    bash tools/loopback.sh .venv/bin/python tools/soak.py --minutes 60 --out soak60/

Three processes, as in a lab: ``rtsort replay`` streams a recording at 1x
(looping) over LSL (or ZeroMQ), ``rtsort run`` sorts it, and this process
consumes the labelled spikes (LSL markers or ZeroMQ messages). Every minute
one JSON line goes to stdout (and ``OUT/minutes.jsonl``): the sorter's resident
memory, the trough-to-arrival latency percentiles of that minute's spikes at
the consumer, the samples the sorter has read and lost (gaps), the spikes it
has sent, late chunks and unencoded spikes. At the end a summary
(``OUT/summary.json``, and the last stdout line): samples sent and sorted, lost
samples (sent - read), memory growth from the first minute, latency over the
whole run.

Without ``--bundle`` it uses ``rtsort bench``'s cached 384-channel recording and
bundle (simulated and trained once, a few minutes, under ``$RTSORT_CACHE``).
LSL runs only inside tools/loopback.sh's loopback-only namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from rtsort.stats import Distribution  # noqa: E402


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process (VmRSS), MB; None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def loopback_only() -> bool:
    if os.environ.get("RTSORT_LOOPBACK_NETNS") != "1" or not os.environ.get("LSLAPICFG"):
        return False
    try:
        return {name for _, name in socket.if_nameindex()} == {"lo"}
    except OSError:
        return False


WINDOW_MIN = 10


class Consumer:
    """Receives the sorter's spikes on a thread; latency per minute and overall, in constant memory."""

    def __init__(self, transport: str, address: str):
        self.transport = transport
        self.address = address
        self.total = Distribution()
        self.minute = Distribution()
        self.minutes = []  # each whole minute's latencies, for the first and last windows
        self.n = 0
        self.seq_lost = 0
        self._last_seq = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if transport == "lsl":
            import pylsl

            info = pylsl.resolve_byprop("name", address, timeout=120)
            if not info:
                raise SystemExit(f"soak: the marker outlet lsl:{address} did not appear")
            self.inlet = pylsl.StreamInlet(info[0], max_buflen=360, processing_flags=pylsl.proc_clocksync)
            self.inlet.open_stream(timeout=30)
            self.inlet.time_correction(timeout=30)
        else:
            import zmq

            self.sub = zmq.Context.instance().socket(zmq.SUB)
            self.sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.sub.setsockopt(zmq.LINGER, 0)
            self.sub.connect(address)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _add(self, lat_s: np.ndarray) -> None:
        with self._lock:
            self.total.add(lat_s)
            self.minute.add(lat_s)
            self.n += lat_s.size

    def _loop(self) -> None:
        if self.transport == "lsl":
            import pylsl

            while not self._stop.is_set():
                _, ts = self.inlet.pull_chunk(timeout=0.1, max_samples=8192, as_numpy=True, min_samples=1)
                if len(ts):
                    self._add(pylsl.local_clock() - np.asarray(ts))
        else:
            from rtsort.streams.replay import now

            while not self._stop.is_set():
                if self.sub.poll(100):
                    head, payload = self.sub.recv_multipart()
                    h = json.loads(head)
                    s = np.frombuffer(payload, dtype=np.dtype([tuple(f) for f in h["fields"]]), count=h["n"])
                    self._add(now() - s["timestamp"])
                    if self._last_seq is not None and h.get("seq") is not None:
                        self.seq_lost += h["seq"] - self._last_seq - 1
                    self._last_seq = h.get("seq")

    def take_minute(self) -> tuple[dict, int]:
        with self._lock:
            d, self.minute = self.minute, Distribution()
        self.minutes.append(d)
        return d.percentiles(1000.0), d.count

    def window(self, first: int, stop: int) -> dict:
        """Latency percentiles (ms) over the whole minutes first..stop-1 (0-based)."""
        d = Distribution()
        for m in self.minutes[first:stop]:
            d.merge(m)
        return {k: round(v, 3) for k, v in d.percentiles(1000.0).items()}

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        if self.transport == "lsl":
            self.inlet.close_stream()
        else:
            self.sub.close(0)


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def soak(minutes: float, channels: int, bundle: Path | None, recording: Path | None, transport: str, out: Path,
         chunk_ms: float = 1.0, extra_run_args=()) -> dict:
    if bundle is None:
        from rtsort.bench import bench_data

        recording, bundle = bench_data(channels, 30000.0, 30.0, progress=False)
    elif recording is None:
        from rtsort.bench import bench_recording

        recording = bench_recording(bundle, 30.0, progress=False)
    if transport == "lsl" and not loopback_only():
        raise SystemExit("soak: LSL needs the loopback-only namespace: bash tools/loopback.sh .venv/bin/python "
                         "tools/soak.py ...")
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    if transport == "lsl":
        src, dst, consumer_address = f"lsl:soak-src-{tag}", f"lsl:soak-spikes-{tag}", f"soak-spikes-{tag}"
    else:
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        src, dst = f"zmq:tcp://127.0.0.1:{ports[0]}", f"zmq:tcp://127.0.0.1:{ports[1]}"
        consumer_address = dst[4:]
    stats_path = out / "run_stats.json"
    stats_path.unlink(missing_ok=True)
    seconds = minutes * 60.0
    cmd = [sys.executable, "-m", "rtsort", "-q"]
    run = subprocess.Popen(cmd + ["run", "--bundle", str(bundle), "--source", src, "--sink", dst, "--stats",
                                  str(stats_path), "--stats-every", "5", "--idle-timeout", "10",
                                  "--resolve-timeout", "120", *extra_run_args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_lines = out / "minutes.jsonl"
    lines = []
    replay = None
    consumer = None
    try:
        consumer = Consumer(transport, consumer_address) if transport == "zmq" else None
        replay = subprocess.Popen(cmd + ["replay", str(recording), "--to", src, "--loop", "--duration", str(seconds),
                                         "--chunk-ms", str(chunk_ms)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        if consumer is None:
            consumer = Consumer(transport, consumer_address)  # the marker outlet exists once the sorter is warm
        t0 = time.monotonic()
        minute = 0
        with open(log_lines, "w") as fh:
            while replay.poll() is None or minute < int(np.ceil(minutes)):
                due = t0 + 60.0 * (minute + 1)
                while time.monotonic() < due and (replay.poll() is None or minute < int(minutes)):
                    if run.poll() is not None:
                        raise SystemExit(f"soak: rtsort run exited early: {run.communicate()[1][-2000:]}")
                    time.sleep(0.5)
                if time.monotonic() < due:  # the replay has ended before a whole minute more
                    break
                minute += 1
                st = read_stats(stats_path)
                lat, n = consumer.take_minute()
                line = {"minute": minute, "t_s": round(time.monotonic() - t0, 1), "rss_mb": rss_mb(run.pid),
                        "latency_ms": {k: round(lat[k], 3) for k in ("p50", "p99", "p99.9", "max") if k in lat},
                        "spikes_received": n, "spikes_out": st.get("spikes"), "samples": st.get("samples"),
                        "lost_samples": st.get("gap_samples"), "late_chunks": st.get("late_chunks"),
                        "skipped_encoding": st.get("skipped_encoding"),
                        "compute_p99_ms": st.get("compute_ms", {}).get("p99")}
                lines.append(line)
                fh.write(json.dumps(line) + "\n")
                fh.flush()
                print(json.dumps(line), flush=True)
        sent_out, replay_err = replay.communicate(timeout=120)
        _, run_err = run.communicate(timeout=120)
    finally:
        for p in (replay, run):
            if p is not None and p.poll() is None:
                p.kill()
        if consumer is not None:
            time.sleep(0.5)
            consumer.close()
    if run.returncode != 0:
        raise SystemExit(f"soak: rtsort run failed ({run.returncode}): {run_err[-2000:]}")
    if replay.returncode != 0:
        raise SystemExit(f"soak: rtsort replay failed ({replay.returncode}): {replay_err[-2000:]}")
    st = read_stats(stats_path)
    sent = int(sent_out.split("sent ", 1)[1].split()[0])
    rss = [ln["rss_mb"] for ln in lines if ln["rss_mb"] is not None]
    summary = {
        "minutes": minutes, "channels": channels, "transport": transport, "chunk_ms": chunk_ms,
        "bundle": str(bundle), "recording": str(recording),
        "samples_sent": sent, "samples_sorted": st.get("samples"), "lost_samples": sent - st.get("samples", 0),
        "gaps": st.get("gaps"), "gap_samples": st.get("gap_samples"), "malformed": st.get("malformed"),
        "spikes_out": st.get("spikes"), "spikes_received": consumer.n,
        "spikes_lost_to_consumer": (st.get("spikes", 0) - consumer.n),
        "zmq_messages_lost_by_seq": consumer.seq_lost if transport == "zmq" else None,
        "late_chunks": st.get("late_chunks"), "skipped_encoding": st.get("skipped_encoding"),
        "rss_mb": {"first_minute": rss[0] if rss else None, "last_minute": rss[-1] if rss else None,
                   "max": max(rss) if rss else None, "growth": (rss[-1] - rss[0]) if rss else None},
        "max_rss_mb": st.get("max_rss_mb"),
        "latency_ms": {k: round(v, 3) for k, v in consumer.total.percentiles(1000.0).items()},
        # the first and the last WINDOW_MIN minutes (half the run when shorter): does the tail drift over hours?
        "window_minutes": (w := min(WINDOW_MIN, len(consumer.minutes) // 2)),
        "latency_first_window_ms": consumer.window(0, w) if w else {},
        "latency_last_window_ms": consumer.window(len(consumer.minutes) - w, len(consumer.minutes)) if w else {},
        "trough_to_emit_ms": st.get("trough_to_emit_ms"), "arrival_ms": st.get("arrival_ms"),
        "compute_ms": st.get("compute_ms"),
        "replay": sent_out.strip(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"summary": summary}), flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0, help="how long to stream (default 60)")
    p.add_argument("--channels", type=int, default=384, help="channels of the cached benchmark data (default 384)")
    p.add_argument("--bundle", type=Path, help="sort with this bundle (default: the cached benchmark bundle)")
    p.add_argument("--recording", type=Path, help="replay this recording (default: one simulated for the bundle)")
    p.add_argument("--transport", choices=["lsl", "zmq"], default="lsl", help="default lsl")
    p.add_argument("--chunk-ms", type=float, default=1.0, help="replay chunk length (default 1)")
    p.add_argument("--out", type=Path, help="folder for minutes.jsonl, run_stats.json and summary.json "
                                            "(default: a temporary folder)")
    args = p.parse_args(argv)
    # SIGTERM (a timeout, kill) unwinds like Ctrl-C, so the replay and the sorter are stopped with the soak
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    out = args.out or Path(tempfile.mkdtemp(prefix="rtsort-soak-"))
    soak(args.minutes, args.channels, args.bundle, args.recording, args.transport, out, args.chunk_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
