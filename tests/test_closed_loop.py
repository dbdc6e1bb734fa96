"""What closed-loop code gates on: each event's latency, confidence and flags; sinks that never hold each other up;
the accuracy-against-latency benchmark."""

import gc
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import zmq

from rtsort.evaluate import right_labels
from rtsort.pipeline import run_stream, sort_recording
from rtsort.streams.zmq import decode_spikes
from rtsort.types import FLAG_PEELED, FLAG_UNENCODED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_events_carry_latency_confidence_flags_and_a_slow_sink_delays_no_other(small_sim, trained):
    """A paced run (live: timestamps on the clock) to a callback that takes 50 ms a batch and a ZeroMQ sink:
    the ZeroMQ events leave within milliseconds all the same, each with its own latency, confidence and flags."""
    rec, _, _ = small_sim
    port = free_port()
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{port}")
    got, arrived, slow_calls = [], [], []
    done = threading.Event()

    def receive():
        from rtsort.streams.replay import now

        while not done.is_set() or sub.poll(0):
            if sub.poll(50):
                s = decode_spikes(sub.recv_multipart()).copy()
                arrived.append(now() - s["timestamp"])
                got.append(s)

    def slow(spikes, timestamps):
        slow_calls.append(spikes.size)
        time.sleep(0.05)

    t = threading.Thread(target=receive)
    t.start()
    time.sleep(0.3)  # the subscription reaches the publisher once it binds (ZeroMQ's slow joiner)
    cpus, collecting = os.sched_getaffinity(0), gc.isenabled()
    try:
        stats = run_stream(trained[1], f"file:{rec.source}", [slow, f"zmq:tcp://127.0.0.1:{port}"], duration=4.0,
                           speed=1.0, cpu=min(os.sched_getaffinity(0)))
    finally:
        done.set()
        t.join(10)
        sub.close(0)
    assert os.sched_getaffinity(0) == cpus and gc.isenabled() == collecting  # the pin and the collector given back
    ev = np.concatenate(got)
    lat_ms = np.concatenate(arrived) * 1000.0
    assert {"latency_ms", "confidence", "flags"} <= set(ev.dtype.names)
    assert ev.size >= 0.9 * stats["spikes"] > 50
    # a synchronous 50 ms sink would hold every batch behind it: seconds by the end of the run
    assert np.percentile(lat_ms, 90) < 25.0, np.percentile(lat_ms, [50, 90, 99])
    assert len(slow_calls) < stats["spikes"]  # the callback could not keep up: it lost batches (counted), not time
    assert np.all(np.isfinite(ev["latency_ms"])) and np.all(ev["latency_ms"] > 0)
    assert np.all(ev["latency_ms"] <= lat_ms * (1 + 1e-6) + 1e-3)  # rtsort's own stamp comes before the arrival
    labelled = ev["unit"] >= 0
    assert labelled.mean() > 0.8
    assert np.all((ev["confidence"][labelled] > 0) & (ev["confidence"][labelled] <= 1))
    assert np.all(np.isnan(ev["confidence"][~labelled]))
    assert np.count_nonzero(ev["flags"] & FLAG_PEELED) > 0
    assert stats["gc_ms"]["max"] < 50  # the young generations, collected once a second of samples


def test_overloaded_spikes_are_flagged_unencoded(small_sim, trained):
    rec, _, _ = small_sim
    got = []
    stats = run_stream(trained[1], f"file:{rec.source}", [lambda s, t: got.append(s)], duration=6.0, speed=50.0,
                       max_lag_ms=5.0)
    ev = np.concatenate(got)
    unenc = (ev["flags"] & FLAG_UNENCODED) > 0
    assert unenc.sum() == stats["skipped_encoding"] > 0
    assert np.all(ev["unit"][unenc] == -1) and np.all(np.isnan(ev["confidence"][unenc]))


def test_confidence_is_calibrated_on_ground_truth(small_sim, trained):
    """Among labels of confidence >= 0.9, at least 90 % are right (SpikeInterface's matching, 0.4 ms), and most
    labels of this easy recording reach 0.9."""
    rec, truth, _ = small_sim
    spikes, _ = sort_recording(rec, trained[1], progress=False)
    lab = spikes[spikes["unit"] >= 0]
    right = right_labels(spikes, truth["sample_index"], truth["unit"], rec.sampling_rate)
    high = lab["confidence"] >= 0.9
    assert high.mean() > 0.5
    assert right[high].mean() >= 0.9, (right[high].mean(), high.mean())


def test_a_pinned_cpu_outside_the_process_set_is_a_one_line_error(trained, tmp_path):
    bad = max(os.sched_getaffinity(0)) + 1000
    p = subprocess.run([sys.executable, "-m", "rtsort", "run", "--bundle", str(trained[1]), "--source",
                        "file:/nonexistent.bin", "--sink", f"file:{tmp_path / 's.npz'}", "--cpu", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"--cpu {bad}: this process may run on CPUs" in p.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())  # refused before any sink was opened


def test_bench_accuracy_scores_the_events_that_arrived_by_each_deadline(small_sim, trained):
    """rtsort bench --accuracy's measurement, over ZeroMQ: events that arrive by a later deadline include the
    earlier ones, and with no deadline the live events score as the offline sort does."""
    from rtsort.bench import DEADLINES_MS, accuracy_vs_latency
    from rtsort.evaluate import sorting_accuracy

    rec, truth, folder = small_sim
    row = accuracy_vs_latency(folder, trained[1], "zmq", 1.0, 6.0, progress=False)
    by = row["accuracy_by_deadline"]
    assert [d["within_ms"] for d in by] == list(DEADLINES_MS) + [None]
    share = [d["events"] for d in by]
    assert share == sorted(share) and share[-1] > 0.95
    assert [d["well_detected"] for d in by] == sorted(d["well_detected"] for d in by)
    h = row["latency_histogram"]
    assert sum(h["counts"]) + h["over_20_ms"] == row["events_scored"] - row["never_received"]
    spikes, _ = sort_recording(rec, trained[1], progress=False)
    lo, hi = row["scored_samples"]  # the samples the live run saw
    lo += int(0.01 * rec.sampling_rate)
    assert lo < 0.5 * hi
    mine, true = (spikes["sample_index"] >= lo) & (spikes["sample_index"] < hi), \
        (truth["sample_index"] >= lo) & (truth["sample_index"] < hi)
    offline = sorting_accuracy(spikes["sample_index"][mine], spikes["unit"][mine], truth["sample_index"][true],
                               truth["unit"][true], rec.sampling_rate)["summary"]
    assert abs(by[-1]["mean_accuracy"] - offline["mean_accuracy"]) < 0.05
