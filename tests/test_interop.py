"""Interoperability with the field's own code, on real sockets (127.0.0.1) and real libraries.

Open Ephys: a ZMQ Interface plugin written here from its source (ZmqInterface.cpp: the per-channel messages of
plugin 0.3 on, the whole-buffer messages of plugin 0.2, its REP heartbeat socket on the data port + 1), read by
``zmq:...?format=openephys``; spikes out as the Event Broadcaster's JSON spike messages (EventBroadcaster.cpp).
LSL: string markers read by a pylsl inlet. Phy: phylib's own TemplateModel opens ``rtsort phy``'s folder and
saves edits as Phy does, and ``rtsort curate`` carries them. Export: pynwb reads the NWB file back and
SpikeInterface loads the saved sorting.
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from rtsort.errors import BundleError
from rtsort.pipeline import run_stream, sort_recording
from rtsort.streams.lsl import MARKER_CHANNELS
from rtsort.streams.openephys import OpenEphysSource


def free_port_pair() -> int:
    """A port P with P and P + 1 free (the plugin's data and heartbeat ports)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def _key(s):
    return np.lexsort((s["channel"], s["sample_index"]))


class OpenEphysGui:
    """The Open Ephys GUI's ZMQ Interface plugin, as its source sends and listens.

    Data: a PUB socket bound on the data port; each message is the envelope ``DATA\\0`` (strlen + 1 bytes), the
    JSON header and the float32 payload. ``send_channels`` is ``ZmqInterface::process`` of plugin 0.3 on: one
    message per selected channel per buffer (``message_num``, content ``stream``, ``channel_num``,
    ``channel_name``, ``num_samples``, ``sample_num``, ``sample_rate``; ``data_size``; ``timestamp`` in wall-clock
    ms). ``send_buffer`` is plugin 0.2's: one message per buffer (``message_no``, content ``n_channels``,
    ``n_samples`` (the buffer's allocated length), ``n_real_samples``, ``timestamp`` (first sample number),
    integer ``sample_rate``), the payload the buffer's channels one after the other. ``send_event`` is
    ``sendEvent`` without data: two frames. Heartbeats: a REP socket on the data port + 1 that answers
    "heartbeat received" (``ZmqInterface::run``), optionally only after ``silent_until``.
    """

    def __init__(self, port: int, silent_until: float = 0.0):
        ctx = zmq.Context.instance()
        self.pub = ctx.socket(zmq.XPUB)  # a PUB on the wire that also tells the test when a subscriber joined
        self.pub.setsockopt(zmq.SNDHWM, 0)  # the test sends faster than real time: queue, never drop
        self.pub.bind(f"tcp://127.0.0.1:{port}")
        self.rep = ctx.socket(zmq.REP)
        self.rep.bind(f"tcp://127.0.0.1:{port + 1}")
        self.silent_until = silent_until
        self.heartbeats = []
        self.message_number = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self):
        while not self._stop.is_set():
            if self.rep.poll(50):
                self.heartbeats.append(json.loads(self.rep.recv().decode()))
                while time.monotonic() < self.silent_until and not self._stop.is_set():
                    time.sleep(0.01)
                self.rep.send(b"heartbeat received")

    def wait_for_client(self, timeout=30.0):
        """Until rtsort's heartbeat came and its SUB socket subscribed (nothing sent before is lost)."""
        deadline, subscribed = time.monotonic() + timeout, False
        while not (subscribed and self.heartbeats) and time.monotonic() < deadline:
            if self.pub.poll(20):
                subscribed |= self.pub.recv()[:1] == b"\x01"
        assert subscribed and self.heartbeats, "rtsort did not subscribe or send its heartbeat"

    def _send(self, envelope: bytes, header: dict, *payload):
        self.pub.send_multipart([envelope, json.dumps(header).encode()] + list(payload))

    def send_channels(self, samples: np.ndarray, sample_num: int, sample_rate: float, skip=(), stream="example"):
        n = samples.shape[0]
        for chan in range(samples.shape[1]):
            self.message_number += 1
            if chan in skip:  # lost on the way
                continue
            self._send(b"DATA\x00", {
                "message_num": self.message_number, "type": "data",
                "content": {"stream": stream, "channel_num": chan, "channel_name": f"CH{chan + 1}",
                            "num_samples": n, "sample_num": sample_num, "sample_rate": sample_rate},
                "data_size": n * 4, "timestamp": int(time.time() * 1000)},
                np.ascontiguousarray(samples[:, chan], dtype=np.float32).tobytes())

    def send_buffer(self, samples: np.ndarray, first: int, sample_rate: float, allocated: int):
        n, c = samples.shape
        buf = np.full((c, allocated), 1e6, np.float32)  # beyond n_real_samples: stale samples of the buffer
        buf[:, :n] = samples.T
        self.message_number += 1
        self._send(b"DATA\x00", {
            "message_no": self.message_number, "type": "data",
            "content": {"n_channels": c, "n_samples": allocated, "n_real_samples": n, "timestamp": first,
                        "sample_rate": int(sample_rate)},
            "data_size": c * allocated * 4}, buf.tobytes())

    def send_event(self, sample_num: int):
        self.message_number += 1
        self._send(b"EVENT\x00", {"message_num": self.message_number, "type": "event",
                                  "content": {"stream": "example", "source_node": 100, "type": 3,
                                              "sample_num": sample_num},
                                  "data_size": 0, "timestamp": int(time.time() * 1000)})

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.pub.close(0)
        self.rep.close(0)


def _uV(rec, start, stop):
    """Samples in uV as float32, computed as the LSL replay computes them."""
    gains = np.asarray(rec.gains_to_uV, dtype=np.float32)
    offsets = np.asarray(rec.offsets_to_uV, dtype=np.float32)
    return (rec.get_traces(start, stop) * gains + offsets).astype(np.float32)


def _read(src, n, timeout=10.0):
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        c = src.read()
        if c is not None:
            out.append(c)
    return out


# ---------------------------------------------------------------- 1 + 2: Open Ephys in and out
def test_openephys_run_matches_sort_and_spikes_leave_as_event_broadcaster_messages(small_sim, trained, tmp_path):
    """`rtsort run --source zmq:...?format=openephys` gives `rtsort sort`'s spikes, and its
    `--sink zmq:...?format=openephys` sends each one as the Event Broadcaster's JSON spike message."""
    from rtsort.cli import main

    rec, _, _ = small_sim
    port, out_port = free_port_pair(), free_port_pair()
    gui = OpenEphysGui(port)
    listener = zmq.Context.instance().socket(zmq.SUB)  # an Event Broadcaster client
    listener.setsockopt(zmq.SUBSCRIBE, b"")
    listener.setsockopt(zmq.RCVHWM, 0)
    listener.setsockopt(zmq.RECONNECT_IVL, 10)  # joins as soon as rtsort binds, before the first spike
    listener.connect(f"tcp://127.0.0.1:{out_port}")
    live, stats = tmp_path / "live.npz", tmp_path / "stats.json"
    runner = subprocess.Popen(
        [sys.executable, "-m", "rtsort", "-q", "run", "--bundle", str(trained[1]), "--source",
         f"zmq:tcp://127.0.0.1:{port}?format=openephys", "--sink", f"file:{live}", "--sink",
         f"zmq:tcp://127.0.0.1:{out_port}?format=openephys", "--idle-timeout", "2.5", "--max-lag-ms", "0",
         "--stats", str(stats)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        gui.wait_for_client()
        block, fs = 1024, rec.sampling_rate  # the GUI's buffers; sent at 4x real time
        t0 = time.monotonic()
        for i, first in enumerate(range(0, rec.n_samples, block)):
            gui.send_channels(_uV(rec, first, first + block), first, fs)
            if i % 50 == 0:
                gui.send_event(first)  # TTL events share the message counter
            delay = t0 + (first + block) / (4 * fs) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        stdout, stderr = runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
        gui.close()
    assert runner.returncode == 0, stderr
    s = json.loads(stats.read_text())
    assert s["samples"] == rec.n_samples and s["gaps"] == 0 and not s["malformed"] and s["source_gaps"] == 0
    ref = tmp_path / "ref.npz"
    assert main(["-q", "sort", str(rec.source), "--bundle", str(trained[1]), "--out", str(ref)]) == 0
    a, b = np.load(ref), np.load(live)
    ia, ib = _key(a), _key(b)
    for k in ("sample_index", "channel", "unit"):
        np.testing.assert_array_equal(a[k][ia], b[k][ib])
    np.testing.assert_allclose(a["amplitude"][ia], b["amplitude"][ib], rtol=1e-5, atol=1e-3)
    # the heartbeat: the plugin lists applications by uuid
    assert {h["type"] for h in gui.heartbeats} == {"heartbeat"}
    assert {h["application"] for h in gui.heartbeats} == {"rtsort"} and len({h["uuid"] for h in gui.heartbeats}) == 1
    # every spike as an Event Broadcaster JSON spike message (frames: uint16 class 1, then the JSON object)
    got = []
    while listener.poll(200):
        frames = listener.recv_multipart()
        assert len(frames) == 2 and struct.unpack("<H", frames[0])[0] == 1
        got.append(json.loads(frames[1]))
    listener.close(0)
    assert len(got) == b["sample_index"].size
    m = {k: np.array([g[k] for g in got]) for k in ("sample_number", "sorted_id", "amp1", "num_channels")}
    im = np.lexsort(([int(g["electrode"][2:]) - 1 for g in got], m["sample_number"]))
    np.testing.assert_array_equal(m["sample_number"][im], b["sample_index"][ib])
    np.testing.assert_array_equal(m["sorted_id"][im], b["unit"][ib])
    np.testing.assert_allclose(m["amp1"][im], -b["amplitude"][ib], rtol=1e-6)
    g = got[0]
    assert g["event_type"] == "spike" and g["num_channels"] == 1 and g["sample_rate"] == rec.sampling_rate
    assert {"stream", "source_node", "electrode", "unit", "channel", "timestamp"} <= set(g)
    assert g["electrode"] == f"CH{g['channel'] + 1}" and g["sorted_id"] == g["unit"]


def test_openephys_buffer_messages_match_sort(small_sim, trained, tmp_path):
    """Plugin 0.2's whole-buffer messages (n_real_samples of a longer buffer): the same spikes as sort, 4 s."""
    from rtsort.io import write_recording

    rec, _, _ = small_sim
    n = 4 * int(rec.sampling_rate)
    part = write_recording(tmp_path / "part.bin", rec.get_traces(0, n), rec.sampling_rate, rec.probe.positions_um,
                           gain_to_uV=rec.gains_to_uV.tolist(), offset_to_uV=rec.offsets_to_uV.tolist())
    port = free_port_pair()
    gui = OpenEphysGui(port)
    result = {}
    runner = threading.Thread(target=lambda: result.update(run_stream(
        trained[1], f"zmq:tcp://127.0.0.1:{port}?format=openephys", [f"file:{tmp_path / 'live.npz'}"],
        idle_timeout=1.0, max_lag_ms=None)))
    runner.start()
    try:
        gui.wait_for_client()
        first, rng = 0, np.random.default_rng(0)
        while first < n:
            k = int(rng.integers(200, 1024))  # the GUI's buffers vary in length
            gui.send_buffer(_uV(rec, first, min(n, first + k)), first, rec.sampling_rate, allocated=1024)
            first += k
            time.sleep(0.002)
        runner.join(60)
    finally:
        gui.close()
    assert not runner.is_alive()
    assert result["samples"] == n and result["gaps"] == 0 and not result["malformed"]
    ref, _ = sort_recording(part, trained[1], progress=False)
    live = np.load(tmp_path / "live.npz")
    for k in ("sample_index", "channel", "unit"):
        np.testing.assert_array_equal(ref[k][_key(ref)], live[k][_key(live)])


def test_openephys_malformed_messages_gaps_and_heartbeat():
    """Malformed messages are counted per kind and skipped; a lost channel message drops its block (a gap); the
    message counter's jumps are counted; a heartbeat reply that does not come replaces the REQ socket while the
    samples keep flowing."""
    port = free_port_pair()
    gui = OpenEphysGui(port, silent_until=time.monotonic() + 0.8)  # the first reply comes late
    src = OpenEphysSource(f"zmq:tcp://127.0.0.1:{port}?format=openephys", 4, 30000.0, timeout_s=0.2,
                          heartbeat_s=0.2)
    try:
        gui.wait_for_client()
        x = np.arange(100 * 4, dtype=np.float32).reshape(100, 4) * 0.5
        for first in (0, 10, 20):
            gui.send_channels(x[first:first + 10], first, 30000.0)
        h = {"type": "data", "data_size": 40,
             "content": {"stream": "example", "channel_num": 1, "num_samples": 10, "sample_num": 30,
                         "sample_rate": 30000.0}}

        def numbered(header):  # a message the plugin sent takes the next number
            gui.message_number += 1
            return json.dumps({**header, "message_num": gui.message_number}).encode()

        y = x[30:40, 1].tobytes()
        gui.pub.send_multipart([b"DATA", json.dumps(h).encode(), y])  # an envelope without its NUL (no number)
        gui.pub.send_multipart([b"DATA\x00", numbered({**h, "content": {"channel_num": 1}}), y])  # fields missing
        gui.pub.send_multipart([b"DATA\x00", numbered(h), y[:-4]])  # 9 of 10 samples
        gui.pub.send_multipart([b"DATA\x00", numbered({**h, "content": {**h["content"], "channel_num": 7}}), y])
        gui.pub.send_multipart([b"DATA\x00", b"{not json", y])  # (no number)
        gui.send_event(30)
        gui.send_channels(x[30:40], 30, 30000.0)
        gui.send_channels(x[40:50], 40, 30000.0, skip=(2,))  # channel 2's message is lost: the block is
        gui.send_channels(x[50:60], 50, 30000.0)
        gui.send_channels(x[60:70], 60, 30000.0)
        chunks = _read(src, 6)
        gui.message_number = 0  # acquisition restarts: both counters start over
        for first in (0, 10, 20):
            gui.send_channels(x[first:first + 10], first, 30000.0)
        after = _read(src, 3)
        time.sleep(1.2)  # heartbeats every 0.2 s: the late reply, a new socket, then prompt replies
    finally:
        src.close()
        gui.close()
    assert [c.first_sample for c in chunks] == [0, 10, 20, 30, 50, 60]
    resume = after[0].first_sample  # sample indices go on after a gap as long as the pause: nothing repeats
    assert resume > 70 and [c.first_sample - resume for c in after] == [0, 10, 20] and src.restarts == 1
    for c in after:
        np.testing.assert_array_equal(c.samples, x[c.first_sample - resume:c.first_sample - resume + 10])
    for c in chunks:
        np.testing.assert_array_equal(c.samples, x[c.first_sample:c.first_sample + 10])
        assert c.samples.dtype == np.float32 and c.timestamp is not None
    assert dict(src.malformed) == {"envelope": 1, "fields": 1, "size": 1, "channel": 1, "header": 1}
    assert src.gaps == [(40, 50), (70, resume)] and src.incomplete_blocks == 1 and src.lost_messages == 1
    assert src.events == 1
    hb = src.heartbeat.stats()
    assert hb["timeouts"] >= 1 and hb["replies"] >= 1 and hb["sent"] >= 3, hb
    assert len({h["uuid"] for h in gui.heartbeats}) == 1 and len(gui.heartbeats) >= 2


def test_openephys_buffer_malformed_and_layout_refused(trained):
    """Whole-buffer form: bad sizes counted and skipped, a gap reported; a stream whose channel count or rate
    differs from the bundle's is refused on its first message, naming both; `rtsort run` says so in one line."""
    port = free_port_pair()
    gui = OpenEphysGui(port)
    src = OpenEphysSource(f"tcp://127.0.0.1:{port}", 4, 30000.0, timeout_s=0.2)
    try:
        gui.wait_for_client()
        x = np.arange(60 * 4, dtype=np.float32).reshape(60, 4)
        gui.send_buffer(x[:10], 0, 30000.0, allocated=16)
        good = {"type": "data", "data_size": 4 * 16 * 4,
                "content": {"n_channels": 4, "n_samples": 16, "n_real_samples": 10, "timestamp": 10,
                            "sample_rate": 30000}}

        def numbered(header):
            gui.message_number += 1
            return json.dumps({**header, "message_no": gui.message_number}).encode()

        gui.pub.send_multipart([b"DATA\x00", numbered(good), bytes(4 * 15 * 4)])  # a short payload
        bad = {**good, "content": {**good["content"], "n_real_samples": 17}}
        gui.pub.send_multipart([b"DATA\x00", numbered(bad), bytes(4 * 16 * 4)])  # more real samples than there are
        gui.pub.send_multipart([b"DATA\x00", numbered(good)])  # no payload frame
        gui.send_buffer(x[10:20], 10, 30000.0, allocated=16)
        gui.send_buffer(x[40:60], 40, 30000.0, allocated=32)
        chunks = _read(src, 3)
        assert [c.first_sample for c in chunks] == [0, 10, 40]
        np.testing.assert_array_equal(chunks[2].samples, x[40:60])
        assert dict(src.malformed) == {"size": 1, "fields": 1, "frames": 1}
        assert src.gaps == [(20, 40)] and src.lost_messages == 0
    finally:
        src.close()
        gui.close()
    for layout, message in (("channels", "has 5 channels but the bundle expects 4"),
                            ("buffer", "sampled at 20000 Hz but the bundle expects 30000 Hz")):
        port = free_port_pair()
        gui = OpenEphysGui(port)
        src = OpenEphysSource(f"tcp://127.0.0.1:{port}", 4, 30000.0, timeout_s=0.2, heartbeat_s=0.5)
        try:
            gui.wait_for_client()
            for first in range(0, 40, 10):
                if layout == "channels":
                    gui.send_channels(np.zeros((10, 5), np.float32), first, 30000.0)
                else:
                    gui.send_buffer(np.zeros((10, 4), np.float32), first, 20000.0, allocated=10)
            with pytest.raises(BundleError, match=message):
                _read(src, 4, timeout=5.0)
        finally:
            src.close()
            gui.close()
    # through the command line: refused at start, one line, exit 2
    port = free_port_pair()
    gui = OpenEphysGui(port)
    run = subprocess.Popen([sys.executable, "-m", "rtsort", "-q", "run", "--bundle", str(trained[1]), "--source",
                            f"zmq:tcp://127.0.0.1:{port}?format=openephys", "--idle-timeout", "5"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        gui.wait_for_client()
        for first in range(0, 300, 100):
            gui.send_channels(np.zeros((100, 16), np.float32), first, 30000.0)
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        gui.close()
    assert run.returncode == 2
    assert stderr.strip().splitlines()[-1].endswith("the Open Ephys stream has 16 channels but the bundle "
                                                    "expects 32"), stderr
    assert "Traceback" not in stderr


def test_uri_queries_are_checked():
    from rtsort.errors import StreamFormatError
    from rtsort.streams import open_sink, open_source

    with pytest.raises(StreamFormatError, match="unknown zmq source format 'openephis'; allowed: rtsort, openephys"):
        open_source("zmq:tcp://127.0.0.1:1?format=openephis", 4, 30000.0)
    with pytest.raises(StreamFormatError, match="unknown query key 'fmt'"):
        open_sink("lsl:x?fmt=string", 30000.0)
    with pytest.raises(StreamFormatError, match="unknown lsl sink format 'text'; allowed: numeric, string"):
        open_sink("lsl:x?format=text", 30000.0)


# ---------------------------------------------------------------- 3: LSL string markers
@pytest.mark.lsl
def test_lsl_string_markers(small_sim, trained):
    """`lsl:NAME?format=string`: a 1-channel cf_string Markers stream at irregular rate with a stable source id,
    one marker per spike (the unit as text) stamped with the trough's LSL time; `lsl:NAME` stays numeric."""
    import pylsl

    from rtsort.streams import open_sink
    from rtsort.streams.zmq import samples_message

    rec, _, _ = small_sim
    name = f"rtsort-test-strings-{os.getpid()}-{time.monotonic_ns()}"
    port = free_port_pair()
    pub = zmq.Context.instance().socket(zmq.XPUB)  # tells when rtsort's SUB socket has joined
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    sent, result = [], {}
    runner = threading.Thread(target=lambda: result.update(run_stream(
        trained[1], f"zmq:tcp://127.0.0.1:{port}", [f"lsl:{name}?format=string", lambda s, t: sent.append((s, t))],
        idle_timeout=1.0, max_lag_ms=None)))
    runner.start()
    try:
        infos = pylsl.resolve_byprop("name", name, timeout=20)
        assert infos, "the string marker outlet did not appear"
        info = infos[0]
        assert (info.type(), info.channel_count(), info.channel_format(), info.nominal_srate()) == \
            ("Markers", 1, pylsl.cf_string, pylsl.IRREGULAR_RATE)
        assert info.source_id() == f"rtsort-markers-{name}-string"
        inlet = pylsl.StreamInlet(info)
        inlet.open_stream(timeout=10)
        assert pub.poll(20000) and pub.recv()[:1] == b"\x01"  # rtsort subscribed, the inlet is open: the samples
        fs, n, step = rec.sampling_rate, 3 * int(rec.sampling_rate), 300
        t0 = pylsl.local_clock()
        for first in range(0, n, step):
            pub.send_multipart(samples_message(rec.get_traces(first, first + step), first, fs, t0 + first / fs,
                                               gain_to_uV=float(rec.gains_to_uV[0])))
            time.sleep(0.002)
        got, stamps = [], []
        while runner.is_alive():
            x, ts = inlet.pull_chunk(timeout=0.2)
            got += [v[0] for v in x]
            stamps += ts
        x, ts = inlet.pull_chunk(timeout=0.5)
        got += [v[0] for v in x]
        stamps += ts
        inlet.close_stream()
    finally:
        runner.join(30)
        pub.close(0)
    assert result["samples"] == n
    units = [str(u) for s, _ in sent for u in s["unit"].tolist()]
    times = np.concatenate([t for _, t in sent])
    assert len(units) > 50 and got == units and all(isinstance(g, str) for g in got)
    np.testing.assert_allclose(stamps, times, rtol=0, atol=1e-6)  # the trough's time on the LSL clock
    np.testing.assert_allclose(times, t0 + np.concatenate([s["sample_index"] for s, _ in sent]) / fs, atol=1e-6)
    numeric = open_sink(f"lsl:{name}-numeric", rec.sampling_rate)  # the default: [unit, channel, ...] int32
    i = numeric.outlet.get_info()
    assert (i.channel_count(), i.channel_format()) == (len(MARKER_CHANNELS), pylsl.cf_int32)
    assert MARKER_CHANNELS[:2] == ("unit", "peak_channel")
    numeric.close()


# ---------------------------------------------------------------- 4: Phy, read by phylib
@pytest.fixture(scope="module")
def sorted_small(small_sim, trained, tmp_path_factory):
    """``rtsort sort``'s spikes of the small recording, saved: (spikes, path)."""
    from rtsort.io import save_spikes

    rec, _, _ = small_sim
    spikes, _ = sort_recording(rec, trained[1], progress=False)
    return spikes, save_spikes(tmp_path_factory.mktemp("spikes") / "s.npz", spikes, rec.sampling_rate)


@pytest.fixture(scope="module")
def phy_folder(small_sim, trained, sorted_small, tmp_path_factory):
    from rtsort.cli import main

    rec, _, _ = small_sim
    out = tmp_path_factory.mktemp("phy") / "phy"
    assert main(["-q", "phy", str(sorted_small[1]), "--bundle", str(trained[1]), "--recording", str(rec.source),
                 "--out", str(out)]) == 0
    return out


def test_phy_folder_opens_in_phylib(small_sim, trained, sorted_small, phy_folder):
    """Phy's own loader opens the folder: spikes per cluster, templates, channel positions and amplitudes."""
    from phylib.io.model import load_model

    from rtsort.bundle import load_bundle

    rec, _, _ = small_sim
    spikes, _ = sorted_small
    b = load_bundle(trained[1])
    model = load_model(phy_folder / "params.py")
    try:
        assert model.n_spikes == spikes.size and model.sample_rate == rec.sampling_rate
        np.testing.assert_array_equal(model.spike_samples, spikes["sample_index"])
        want = np.where(spikes["unit"] >= 0, spikes["unit"], b.n_units)  # unassigned: one extra cluster
        np.testing.assert_array_equal(model.spike_clusters, want)
        for c in np.unique(want):
            assert model.get_cluster_spikes(c).size == np.count_nonzero(want == c)
        np.testing.assert_allclose(model.amplitudes, np.abs(spikes["amplitude"]), rtol=1e-6)
        np.testing.assert_allclose(model.channel_positions, b.probe.positions_um)
        assert model.n_templates == b.n_units + 1
        np.testing.assert_allclose(model.sparse_templates.data[:b.n_units], b.templates, rtol=1e-6, atol=1e-6)
        for u in range(b.n_units):  # Phy's template of a cluster is the bundle's template of the unit
            t = model.get_template(u, unwhiten=False)
            np.testing.assert_allclose(t.template, b.templates[u][:, t.channel_ids], atol=1e-6)
        assert model.traces.shape == (rec.n_samples, rec.n_channels)  # the raw data Phy shows waveforms from
        assert model.metadata["group"][b.n_units] == "noise"
    finally:
        model.close()


def test_phy_edits_saved_by_phylib_are_carried_by_curate(small_sim, trained, sorted_small, phy_folder, tmp_path):
    """Merge two clusters, call one noise and split one, saved through phylib as Phy saves them (new ids after
    the largest for a merge and for each part of a split); `rtsort curate` carries each edit into the bundle
    and leaves the other units, the encoder and the front end as they were."""
    from phylib.io.model import load_model

    from rtsort.bundle import load_bundle
    from rtsort.cli import main

    rec, _, _ = small_sim
    spikes, _ = sorted_small
    b = load_bundle(trained[1])
    folder = tmp_path / "phy"
    shutil.copytree(phy_folder, folder)
    model = load_model(folder / "params.py")
    sc = model.spike_clusters.copy()
    groups = dict(model.metadata["group"])
    counts = np.bincount(sc[sc < b.n_units], minlength=b.n_units)
    a, m, noise, split = (int(u) for u in np.argsort(counts)[::-1][:4])
    top = int(sc.max())
    merged, part1, part2 = top + 1, top + 2, top + 3
    sc[np.isin(sc, (a, m))] = merged
    of_split = np.flatnonzero(sc == split)
    deep = np.abs(model.amplitudes[of_split]) >= np.median(np.abs(model.amplitudes[of_split]))
    sc[of_split[deep]], sc[of_split[~deep]] = part1, part2  # a split by amplitude, as in Phy's amplitude view
    groups.update({merged: "good", part1: groups[split], part2: groups[split], noise: "noise"})
    for gone in (a, m, split):
        groups.pop(gone)
    model.save_spike_clusters(sc)
    model.save_metadata("group", groups)
    model.close()
    out = tmp_path / "curated"
    assert main(["-q", "curate", str(trained[1]), "--phy", str(folder), "--recording", str(rec.source), "--out",
                 str(out)]) == 0
    nb = load_bundle(out)
    kept = sorted(c for c in set(np.unique(sc).tolist()) if groups.get(c) != "noise")
    assert [u["phy_cluster"] for u in nb.units] == kept  # each edit, and only those, in the unit table
    untouched = [c for c in range(b.n_units) if c not in (a, m, split, noise)]
    assert set(kept) == set(untouched) | {merged, part1, part2}
    assert {u["phy_group"] for u in nb.units if u["phy_cluster"] == merged} == {"good"}
    # nothing else changes: the encoder, the front end's parameters, the probe, the noise levels
    assert nb.encoder_path.read_bytes() == b.encoder_path.read_bytes()
    assert nb.config == b.config and nb.sampling_rate == b.sampling_rate
    np.testing.assert_array_equal(nb.probe.positions_um, b.probe.positions_um)
    np.testing.assert_array_equal(nb.noise_levels, b.noise_levels)
    old_n = {int(u["unit"]): u["n_spikes"] for u in b.units}
    for u in nb.units:
        if u["phy_cluster"] in untouched:  # the untouched units keep their spikes (within 3 %)
            assert abs(u["n_spikes"] - old_n[u["phy_cluster"]]) <= 0.03 * old_n[u["phy_cluster"]] + 2, u
    # the curated bundle sorts as the curator asked
    new, _ = sort_recording(rec, out, progress=False)
    key = lambda s: s["sample_index"] * 1000 + s["channel"]  # noqa: E731
    _, i_new, i_old = np.intersect1d(key(new), key(spikes), return_indices=True)
    assert i_old.size >= 0.95 * spikes.size
    phy_of_unit = np.array([u["phy_cluster"] for u in nb.units] + [-1])
    got = phy_of_unit[new["unit"][i_new]]  # -1 indexes the appended -1
    asked = sc[i_old]
    for c in untouched + [merged]:
        assert np.mean(got[asked == c] == c) >= 0.9, c
    assert np.mean(got[asked == noise] == -1) >= 0.9
    # the split: both parts are units with centroids of their own, and the split cluster's spikes go to them
    # (to the nearer part's centroid: halves cut by amplitude alone, which the features barely separate, mostly
    # fall on one side)
    unit_of = {u["phy_cluster"]: u["unit"] for u in nb.units}
    assert unit_of[part1] in nb.centroid_unit and unit_of[part2] in nb.centroid_unit
    both = np.isin(asked, (part1, part2))
    assert np.mean(np.isin(got[both], (part1, part2))) >= 0.9


# ---------------------------------------------------------------- 5: a curated bundle into a live run
def _relabelled_bundle(src, out, config=None):
    """The bundle ``src`` with its units renumbered (unit u becomes u + 1, the last becomes 0), written to ``out``
    as curation writes one (manifest last); ``config`` replaces its configuration."""
    from rtsort.bundle import load_bundle, save_bundle

    b = load_bundle(src)
    c = b.contents()
    n = b.n_units
    perm = (np.arange(n) + 1) % n  # old unit -> new unit
    cu = c["centroid_unit"]
    c["centroid_unit"] = np.where(cu >= 0, perm[np.maximum(cu, 0)], cu)  # -1 (noise) and TAIL stay
    c["templates"] = b.templates[np.argsort(perm)]
    units = [dict(u, unit=int(perm[int(u["unit"])])) for u in b.units]
    c["units"] = sorted(units, key=lambda u: u["unit"])
    if config is not None:
        c["config"] = config
    tmp = out.with_name(out.name + ".encoder.onnx")
    shutil.copy(b.encoder_path, tmp)
    c["encoder_file"] = tmp
    save_bundle(out, **c)
    tmp.unlink()
    return perm


def test_curated_bundle_takes_over_a_live_run_at_a_cut_sample(small_sim, trained, tmp_path, monkeypatch):
    """A bundle written to the watched directory while the stream runs takes over between two chunks: every spike
    before the logged cut sample is the running bundle's, every spike from it the new bundle's, each exactly as a
    run of that bundle alone gives it; no sample is lost (no gap, every chunk counted)."""
    from rtsort import swap
    from rtsort.io.spikes import load_spikes

    monkeypatch.setattr(swap, "POLL_S", 0.05)
    rec, _, _ = small_sim
    curated = tmp_path / "curated"
    perm = _relabelled_bundle(trained[1], curated)
    refs = {}
    for name, b in (("old", trained[1]), ("new", curated)):
        run_stream(b, f"file:{rec.source}", [f"file:{tmp_path / name}.npz"], max_lag_ms=None)
        refs[name] = load_spikes(tmp_path / f"{name}.npz")[0]
    assert np.array_equal(refs["new"]["unit"], np.where(refs["old"]["unit"] >= 0, perm[refs["old"]["unit"]],
                                                        refs["old"]["unit"]))  # the same sort, other numbers
    watched = tmp_path / "watched"
    watched.mkdir()

    def curate_later():
        time.sleep(1.0)
        shutil.copytree(curated, watched, dirs_exist_ok=True)  # the manifest may land before the arrays: retried

    writer = threading.Thread(target=curate_later)
    writer.start()
    stats = run_stream(trained[1], f"file:{rec.source}", [f"file:{tmp_path / 'live'}.npz"], speed=3.0,
                       max_lag_ms=None, watch_bundle=watched)
    writer.join()
    assert len(stats["swaps"]) == 1 and stats["swaps_refused"] == 0
    cut = stats["swaps"][0]["sample_index"]
    assert 0 < cut < rec.n_samples - int(0.5 * rec.sampling_rate), cut
    assert stats["gaps"] == 0 and stats["samples"] == rec.n_samples
    live = load_spikes(tmp_path / "live.npz")[0]
    want = np.concatenate([refs["old"][refs["old"]["sample_index"] < cut],
                           refs["new"][refs["new"]["sample_index"] >= cut]])
    want = want[_key(want)]
    live = live[_key(live)]
    for field in ("sample_index", "channel", "unit"):
        np.testing.assert_array_equal(live[field], want[field])
    assert stats["spikes"] == live.size
    # both bundles' units are there, each on its side of the cut
    before, after = live["sample_index"] < cut, live["sample_index"] >= cut
    assert before.sum() > 100 and after.sum() > 100


def test_a_bundle_with_another_front_end_is_refused_and_the_run_goes_on(trained, tmp_path, caplog):
    """A bundle whose detection differs cannot share the running front end: the watcher refuses it, naming the
    difference; a half-written one (no manifest yet, or checksums that do not match) is tried again."""
    from rtsort.bundle import load_bundle
    from rtsort.config import Config
    from rtsort.swap import BundleWatcher, differences

    b = load_bundle(trained[1])
    d = b.config.to_dict()
    d["detect"]["amp_threshold"] += 1.0
    cfg = Config.from_dict(d)
    other = tmp_path / "other"
    _relabelled_bundle(trained[1], other, config=cfg)
    why = differences(b, load_bundle(other))
    assert len(why) == 1 and why[0].startswith("[detect] amp_threshold"), why
    same = tmp_path / "same"
    _relabelled_bundle(trained[1], same)
    assert differences(b, load_bundle(same)) == []

    built = []
    watched = tmp_path / "watched"
    watched.mkdir()
    watcher = BundleWatcher(watched, lambda nb: built.append(nb) or nb, lambda nb: differences(b, nb), poll_s=0.02)
    try:
        shutil.copytree(other, watched, dirs_exist_ok=True)
        deadline = time.monotonic() + 10
        while watcher.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.refused == 1 and not built and watcher.take() is None
        assert "amp_threshold" in caplog.text
        templates = watched / "templates.npy"  # a bundle being written: its arrays do not match the manifest yet
        np.save(templates, np.zeros(3, np.float32))
        shutil.copy(same / "manifest.json", watched / "manifest.json")
        time.sleep(0.3)
        assert not built and watcher.refused == 1
        shutil.copy(same / "templates.npy", templates)
        while not built and time.monotonic() < deadline:
            time.sleep(0.02)
        taken = watcher.take()
        assert taken is not None and taken[0].n_units == b.n_units and watcher.take() is None
    finally:
        watcher.close()


# ---------------------------------------------------------------- 6: NWB and SpikeInterface
def test_export_nwb_read_back_by_pynwb(small_sim, trained, sorted_small, tmp_path):
    from pynwb import NWBHDF5IO

    from rtsort.bundle import load_bundle
    from rtsort.cli import main

    rec, _, _ = small_sim
    spikes, path = sorted_small
    b = load_bundle(trained[1])
    out = tmp_path / "s.nwb"
    assert main(["-q", "export", str(path), "--bundle", str(trained[1]), "--to", "nwb", str(out)]) == 0
    with NWBHDF5IO(str(out), "r") as io:
        nwb = io.read()
        units = nwb.units.to_dataframe()
        el = nwb.electrodes.to_dataframe()
        assert list(units.index) == list(range(b.n_units))
        fs = rec.sampling_rate
        for u in range(b.n_units):
            np.testing.assert_allclose(units.loc[u, "spike_times"],
                                       np.sort(spikes["sample_index"][spikes["unit"] == u]) / fs, rtol=0, atol=1e-12)
            np.testing.assert_allclose(units.loc[u, "waveform_mean"], b.templates[u] * 1e-6, rtol=1e-6, atol=1e-12)
            row = b.units[u]
            assert units.loc[u, "peak_channel"] == row["peak_channel"]
            assert list(units.loc[u, "electrodes"].index) == [row["peak_channel"]]
            for metric in ("snr", "firing_rate_hz", "isi_violations_ratio", "presence_ratio", "n_spikes"):
                assert units.loc[u, metric] == pytest.approx(row[metric], nan_ok=True)
        np.testing.assert_allclose(el[["rel_x", "rel_y"]].to_numpy(), b.probe.positions_um)
        assert list(el["channel_name"]) == list(b.probe.channel_ids)
        assert nwb.units.waveform_rate == fs and nwb.units.waveform_unit == "volts"


def test_export_spikeinterface_loads_with_the_same_trains(small_sim, trained, sorted_small, tmp_path, capsys):
    import spikeinterface as si

    from rtsort.cli import main
    from rtsort.io import to_spikeinterface

    rec, _, _ = small_sim
    spikes, path = sorted_small
    out = tmp_path / "si"
    assert main(["-q", "export", str(path), "--bundle", str(trained[1]), "--to", "spikeinterface", str(out)]) == 0
    sorting = si.load(out)
    api = to_spikeinterface(spikes, rec.sampling_rate)  # the Python API, no bundle: units with spikes only
    assert sorting.sampling_frequency == rec.sampling_rate == api.sampling_frequency
    for u in sorting.unit_ids:
        want = np.sort(spikes["sample_index"][spikes["unit"] == u])
        np.testing.assert_array_equal(sorting.get_unit_spike_train(u), want)
        if want.size:
            np.testing.assert_array_equal(api.get_unit_spike_train(u), want)
    assert sum(sorting.get_unit_spike_train(u).size for u in sorting.unit_ids) == np.count_nonzero(spikes["unit"] >= 0)
    assert "snr" in sorting.get_property_keys() and "peak_channel" in sorting.get_property_keys()
    # a missing optional package is one line naming the extra
    capsys.readouterr()
    code = ("import sys; sys.modules['pynwb'] = None; from rtsort.cli import main; "
            f"sys.exit(main(['export', {str(path)!r}, '--bundle', {str(trained[1])!r}, '--to', 'nwb', "
            f"{str(tmp_path / 'x.nwb')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == \
        "rtsort export: error: pynwb is not installed: pip install 'rtsort[export]'", r.stderr


def test_runtime_imports_no_export_libraries():
    code = ("import sys, rtsort.pipeline, rtsort.streams, rtsort.streams.openephys, rtsort.io, rtsort.io.export; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pynwb', 'phylib', 'spikeinterface', "
            "'hdmf'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)
