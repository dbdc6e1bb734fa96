"""The Open Ephys GUI over ZeroMQ: its ZMQ Interface plugin as a source, Event Broadcaster spikes as a sink.

Source (``zmq:tcp://HOST:5556?format=openephys``): the ZMQ Interface plugin
binds a PUB socket on its data port and sends multipart messages of an
envelope (``b"DATA\\0"`` for samples, ``b"EVENT\\0"`` for events and spikes), a
JSON header and a float32 payload in microvolts. Two layouts of ``data``
messages are read, as the plugin has sent them:

- one message per buffer (plugin 0.2, GUI 0.4/0.5): header ``{"message_no",
  "type": "data", "content": {"n_channels", "n_samples", "n_real_samples",
  "timestamp" (first sample number), "sample_rate"}, "data_size"}``, payload
  ``n_channels`` rows of ``n_samples`` floats of which the first
  ``n_real_samples`` are valid;
- one message per channel (plugin 0.3 on, GUI 0.6 on): header
  ``{"message_num", "type": "data", "content": {"stream", "channel_num",
  "num_samples", "sample_num", "sample_rate"}, "data_size", "timestamp" (ms,
  wall clock)}``, payload ``num_samples`` floats. Channels are put back
  together into one chunk per ``sample_num``; the stream's channels are the
  ``channel_num`` values of its blocks, learnt from two consecutive whole
  blocks (the first block seen may have begun before rtsort joined), in
  ascending order. (The plugin's short-lived API 8 variant, ``n_samples`` /
  ``n_real_samples`` / ``timestamp`` per channel, is read too.)

Missing messages show as jumps of the message counter (``lost_messages``) and
as gaps of the sample counter, reported like every source's gaps; a block
that lost a channel's message is dropped whole (``incomplete_blocks``) and
shows as a gap. A sample counter that goes back means the GUI restarted
acquisition: the chunks go on after a gap (``restarts``), so sample indices
after a restart no longer equal the GUI's. Malformed messages (wrong
envelope, bad JSON, missing fields, a payload of the wrong size, a channel
outside the stream's) are counted per kind, logged once per kind and
skipped. The stream's channel count and rate are checked against the bundle
on its first whole block, and a stream that differs is refused then.

So that the GUI lists rtsort among its connected applications, a background
thread sends the plugin's heartbeat (JSON ``{"application", "uuid", "type":
"heartbeat"}``) every 2 s to a REQ socket on the data port + 1; a reply that
does not come within the interval closes that socket and opens a new one (the
"lazy pirate" of the ZeroMQ guide), so the data path never waits on it.

Sink (``zmq:tcp://127.0.0.1:5557?format=openephys``): each spike as the Event
Broadcaster plugin's JSON spike message: two frames, the uint16 event class
(1: spike) and a JSON object ``{"event_type": "spike", "stream",
"source_node", "electrode", "num_channels", "sample_rate", "sample_number",
"sorted_id", "amp1"}`` with rtsort's fields after those (``unit``,
``channel``, ``timestamp``).
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
import time
import uuid
from collections import Counter, deque

import numpy as np

from ..errors import BundleError
from ..types import Chunk
from .replay import now
from .zmq import ZmqPublisher, parse_uri

log = logging.getLogger("rtsort.streams.openephys")

DATA, EVENT = b"DATA\x00", b"EVENT\x00"
APPLICATION = "rtsort"
HEARTBEAT_S = 2.0
SPIKE_CLASS = struct.pack("<H", 1)  # the Event Broadcaster's first frame: 0 TTL, 1 spike
LEARN_BLOCKS = 8  # per-channel blocks kept while the stream's channels are learnt


def _rate_differs(a: float, b: float) -> bool:
    """Whether the stream's rate ``a`` is not the bundle's ``b`` (plugin 0.2 sends ``(int) sampleRate``)."""
    return abs(a - b) > (1.0 if float(a).is_integer() else 1e-6 * b)


class _Block:
    """One ``sample_num``'s channels, as the per-channel messages arrive."""

    __slots__ = ("first", "n", "fs", "columns", "t_sent")

    def __init__(self, first: int, n: int, fs: float, t_sent: float):
        self.first, self.n, self.fs, self.t_sent = first, n, fs, t_sent
        self.columns = {}


class Heartbeat:
    """The ZMQ Interface plugin's heartbeat, on a thread of its own: never blocks the caller.

    Parameters
    ----------
    context : zmq.Context
    address : str
        ``tcp://HOST:PORT`` of the plugin's listening (REP) socket: its data port + 1.
    interval_s : float
        Seconds between heartbeats, and how long a reply is waited for.
    """

    def __init__(self, context, address: str, interval_s: float = HEARTBEAT_S, application: str = APPLICATION):
        self.address = address
        self.interval_s = float(interval_s)
        self.uuid = str(uuid.uuid4())  # one per source: the GUI lists applications by it
        self.message = json.dumps({"application": application, "uuid": self.uuid, "type": "heartbeat"}).encode()
        self.sent = self.replies = self.timeouts = 0
        self._ctx = context
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtsort-openephys-heartbeat", daemon=True)
        self._thread.start()

    def _socket(self):
        import zmq

        s = self._ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.address)
        return s

    def _run(self) -> None:
        import zmq

        sock = None
        try:
            while not self._stop.is_set():
                if sock is None:
                    sock = self._socket()
                due = time.monotonic() + self.interval_s
                try:
                    sock.send(self.message, zmq.NOBLOCK)
                    self.sent += 1
                except zmq.Again:  # no room to queue it: count, start over with a fresh socket
                    got = False
                else:
                    got = False
                    while not self._stop.is_set() and time.monotonic() < due:
                        if sock.poll(min(100, max(1, int(1000 * (due - time.monotonic()))))):
                            sock.recv(zmq.NOBLOCK)
                            self.replies += 1
                            got = True
                            break
                if self._stop.is_set():
                    break
                if not got:  # a REQ socket that lost its reply can never send again: replace it
                    self.timeouts += 1
                    if self.timeouts == 1:
                        log.info("%s: no reply to rtsort's heartbeat (is the ZMQ Interface plugin's listening "
                                 "port its data port + 1?); retrying every %g s", self.address, self.interval_s)
                    sock.close(0)
                    sock = None
                self._stop.wait(max(0.0, due - time.monotonic()))
        except Exception:  # the heartbeat is a courtesy to the GUI: it must never take the source down
            log.exception("%s: heartbeat thread stopped", self.address)
        finally:
            if sock is not None:
                sock.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def stats(self) -> dict:
        return {"sent": self.sent, "replies": self.replies, "timeouts": self.timeouts}


class OpenEphysSource:
    """Read the Open Ephys ZMQ Interface plugin's data messages as :class:`Chunk` objects (float32 uV).

    Parameters
    ----------
    uri : str
        ``zmq:tcp://HOST:PORT?format=openephys`` (or the bare address): the plugin's data port.
    n_channels, sampling_rate : the bundle's; a stream that differs is refused (:class:`BundleError`)
    timeout_s : float
        How long :meth:`read` waits for a message before returning None.
    heartbeat_s : float or None
        Heartbeat interval (None: no heartbeat). Sent to the data port + 1 of a ``tcp://`` address.
    """

    gain_to_uV = 1.0  # the plugin's float32 samples are microvolts

    def __init__(self, uri: str, n_channels: int, sampling_rate: float, timeout_s: float = 0.2,
                 heartbeat_s: float | None = HEARTBEAT_S, context=None):
        import zmq

        self.address = parse_uri(uri.partition("?")[0])
        self.n_channels = int(n_channels)
        self.sampling_rate = float(sampling_rate)
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")  # DATA and EVENT: the message counter counts both
        self.socket.setsockopt(zmq.RCVHWM, 100000)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.address)
        self.heartbeat = None
        if heartbeat_s and self.address.startswith("tcp://"):
            host, _, port = self.address[6:].rpartition(":")
            try:
                self.heartbeat = Heartbeat(self._ctx, f"tcp://{host}:{int(port) + 1}", heartbeat_s)
            except ValueError:
                log.warning("%s: no port number; no heartbeat sent", self.address)
        self.malformed = Counter()
        self.gaps = []  # (expected first sample, received first sample), in rtsort's sample indices
        self.lost_messages = 0
        self.incomplete_blocks = 0
        self.restarts = 0
        self.events = 0  # EVENT messages (TTL, spikes): counted, not used
        self.stream_name = None
        self.layout = None  # "buffer" or "channels", from the first data message
        self.n_samples = 0
        self.next_sample = None  # the next sample the stream owes, on the GUI's counter
        self._offset = 0  # rtsort's sample index minus the GUI's (changes at a restart)
        self._last_message = None
        self._last_arrival = None
        self._origin = self._origin_at = None  # the sample clock's origin on the stream clock (_sent_at)
        self._ready = deque()
        self._columns = None  # per-channel form: channel_num -> column, once learnt
        self._open = None  # the block being put together
        self._learning = deque(maxlen=LEARN_BLOCKS)  # closed blocks while the channels are not known yet
        self._checked = False

    # ------------------------------------------------------------------ reading
    def read(self) -> Chunk | None:
        """The next whole chunk, or None after ``timeout_s`` without one."""
        if self._ready:
            return self._ready.popleft()
        while self.socket.poll(self.timeout_ms):
            self._handle(self.socket.recv_multipart(copy=False))
            if self._ready:
                return self._ready.popleft()
        return None

    def _bad(self, kind: str, detail: str) -> None:
        if not self.malformed[kind]:
            log.warning("%s: malformed Open Ephys message (%s): %s; counted and skipped from now on", self.address,
                        kind, detail)
        self.malformed[kind] += 1

    def _handle(self, frames) -> None:
        envelope = bytes(frames[0].buffer)
        if envelope not in (DATA, EVENT):
            return self._bad("envelope", f"envelope {envelope[:16]!r}, expected b'DATA\\x00' or b'EVENT\\x00'")
        if len(frames) < 2:
            return self._bad("frames", "an envelope without its header")
        try:
            h = json.loads(bytes(frames[1].buffer).decode("utf-8"))
            if not isinstance(h, dict):
                raise ValueError("header is not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            return self._bad("header", f"bad JSON header ({exc})")
        self._count_message(h.get("message_num", h.get("message_no")))
        if envelope == EVENT:
            self.events += 1
            return None
        if h.get("type") != "data":
            return self._bad("type", f"type {h.get('type')!r} in a DATA message, expected 'data'")
        c = h.get("content")
        if not isinstance(c, dict):
            return self._bad("fields", "no 'content' object in the header")
        if len(frames) != 3:
            return self._bad("frames", f"{len(frames)} frames, expected 3 (envelope, header, samples)")
        payload = frames[2].buffer
        if "n_channels" in c:
            return self._buffer_message(h, c, payload)
        if "channel_num" in c:
            return self._channel_message(h, c, payload)
        return self._bad("fields", f"content has neither 'n_channels' nor 'channel_num': {sorted(c)}")

    def _count_message(self, number) -> None:
        if not isinstance(number, int) or isinstance(number, bool):
            return
        last, self._last_message = self._last_message, number
        if last is not None and number > last + 1:
            if not self.lost_messages:
                log.warning("%s: %d messages lost before message %d (counted from now on)", self.address,
                            number - last - 1, number)
            self.lost_messages += number - last - 1

    def _restarted(self, first: int) -> bool:
        """Whether a block starting at ``first`` (the GUI's counter) means acquisition started over."""
        return self.next_sample is not None and first < self.next_sample

    def _restart(self, first: int) -> None:
        """The GUI's sample counter went back to ``first``: acquisition started over. rtsort's sample indices go
        on after a gap as long as the pause (at least one sample), so the filters restart and nothing repeats."""
        expected = self.next_sample + self._offset
        idle = round((now() - self._last_arrival) * self.sampling_rate) if self._last_arrival else 0
        resume = expected + max(1, idle)
        self._offset = resume - first
        self.next_sample = first
        self._origin = None
        self.restarts += 1
        self.gaps.append((expected, resume))
        log.warning("%s: the sample counter went back to %d (acquisition restarted); sample indices go on from %d",
                    self.address, first, resume)

    def _sent_at(self, h: dict, stop: int) -> float:
        """The time of the sample before ``stop`` (the GUI's counter) on the stream clock.

        The current plugin stamps each message with its send time (wall-clock
        ms): used when it is plausible on this machine's clock. Otherwise the
        sample counter, anchored at the earliest arrival seen (a leaky minimum
        that follows up to 100 ppm of clock drift): either way a backlog in
        rtsort's socket shows as lag, which the overload policy needs, where
        the arrival time would hide it.
        """
        arrival = now()
        ms = h.get("timestamp")
        if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms > 1e11:  # wall-clock ms, not a sample
            t = ms / 1000.0 - (time.time() - arrival)
            if arrival - 5.0 < t <= arrival + 0.002:  # else another machine's clock: the sample clock below
                return min(t, arrival)
        origin = arrival - (stop - 1) / self.sampling_rate  # when sample 0 was taken, if this one left at once
        if self._origin is None:
            self._origin, self._origin_at = origin, arrival
        else:
            self._origin = min(self._origin + 1e-4 * (arrival - self._origin_at), origin)
            self._origin_at = arrival
        return self._origin + (stop - 1) / self.sampling_rate

    def _check_layout(self, n_channels: int, fs: float) -> None:
        if n_channels != self.n_channels:
            raise BundleError(f"{self.address}: the Open Ephys stream has {n_channels} channels but the bundle "
                              f"expects {self.n_channels}")
        if _rate_differs(fs, self.sampling_rate):
            raise BundleError(f"{self.address}: the Open Ephys stream is sampled at {fs:g} Hz but the bundle "
                              f"expects {self.sampling_rate:g} Hz")
        self._checked = True

    def _buffer_message(self, h: dict, c: dict, payload) -> None:
        try:
            n_ch, n, first = int(c["n_channels"]), int(c["n_samples"]), int(c["timestamp"])
            n_real = int(c.get("n_real_samples", n))
            fs = float(c["sample_rate"])
        except (KeyError, TypeError, ValueError) as exc:
            return self._bad("fields", f"missing or invalid content field ({exc!r})")
        if n_ch < 1 or n < 0 or not 0 <= n_real <= n or not math.isfinite(fs) or fs <= 0:
            return self._bad("fields", f"n_channels {n_ch}, n_samples {n}, n_real_samples {n_real}, rate {fs}")
        size = n_ch * n * 4
        if len(payload) != size or h.get("data_size", size) != size:
            return self._bad("size", f"payload of {len(payload)} bytes (data_size {h.get('data_size')}) for "
                                     f"{n_ch} channels x {n} float32 samples")
        if self._restarted(first):
            self._restart(first)
            self._checked = False  # the GUI may have new channels: check them again
        if not self._checked:
            self._check_layout(n_ch, fs)
        elif n_ch != self.n_channels:
            return self._bad("channels", f"{n_ch} channels, expected {self.n_channels}")
        elif _rate_differs(fs, self.sampling_rate):
            return self._bad("rate", f"sampling rate {fs:g} Hz, expected {self.sampling_rate:g}")
        self.layout = self.layout or "buffer"
        if n_real == 0:
            return None
        samples = np.frombuffer(payload, dtype="<f4").reshape(n_ch, n)[:, :n_real].T.copy()
        self._emit(first, samples, self._sent_at(h, first + n_real))

    def _channel_message(self, h: dict, c: dict, payload) -> None:
        try:
            ch = int(c["channel_num"])
            if "num_samples" in c:  # plugin 0.3 on
                n = n_valid = int(c["num_samples"])
                first = int(c["sample_num"])
            else:  # the API 8 variant
                n, first = int(c["n_samples"]), int(c["timestamp"])
                n_valid = int(c.get("n_real_samples", n))
            fs = float(c["sample_rate"])
        except (KeyError, TypeError, ValueError) as exc:
            return self._bad("fields", f"missing or invalid content field ({exc!r})")
        if n < 0 or not 0 <= n_valid <= n or ch < 0 or not math.isfinite(fs) or fs <= 0:
            return self._bad("fields", f"channel_num {ch}, {n} samples ({n_valid} valid), rate {fs}")
        if len(payload) != n * 4 or h.get("data_size", n * 4) != n * 4:
            return self._bad("size", f"payload of {len(payload)} bytes (data_size {h.get('data_size')}) for "
                                     f"{n} float32 samples")
        if self._checked and _rate_differs(fs, self.sampling_rate):
            return self._bad("rate", f"sampling rate {fs:g} Hz, expected {self.sampling_rate:g}")
        if self._columns is not None and ch not in self._columns:
            return self._bad("channel", f"channel_num {ch} is not one of the stream's {len(self._columns)} "
                                        f"channels ({min(self._columns)}..{max(self._columns)})")
        self.layout = self.layout or "channels"
        self.stream_name = self.stream_name or c.get("stream")
        x = np.frombuffer(payload, dtype="<f4", count=n_valid)
        blk = self._open
        if blk is None or first != blk.first:
            self._close_block()
            if self._restarted(first):  # the GUI may have new channels: learn them again
                self._restart(first)
                self._columns, self._checked = None, False
                self._learning.clear()
            blk = self._open = _Block(first, n_valid, fs, self._sent_at(h, first + n_valid))
        if x.size != blk.n:
            return self._bad("size", f"channel {ch} has {x.size} samples, its block {blk.n}")
        if ch in blk.columns:
            return self._bad("duplicate", f"channel {ch} twice for sample_num {first}")
        blk.columns[ch] = x
        if self._columns is not None and len(blk.columns) == len(self._columns):
            self._open = None
            self._emit_block(blk)

    def _close_block(self) -> None:
        """The open block is over (a message of another block came): emit it, learn from it, or drop it."""
        blk, self._open = self._open, None
        if blk is None:
            return
        if self._columns is None:
            self._learning.append(blk)
            self._learn()
        elif len(blk.columns) < len(self._columns):  # a channel's message never came: the block is lost
            self.incomplete_blocks += 1
            log.debug("%s: block at sample %d lost %d of %d channels", self.address, blk.first,
                      len(self._columns) - len(blk.columns), len(self._columns))

    def _learn(self) -> None:
        """Two consecutive closed blocks with the same channels give the stream's channels."""
        if len(self._learning) < 2 or set(self._learning[-1].columns) != set(self._learning[-2].columns):
            return
        channels = sorted(self._learning[-1].columns)
        self._check_layout(len(channels), self._learning[-1].fs)  # then per message
        self._columns = {ch: i for i, ch in enumerate(channels)}
        blocks, self._learning = list(self._learning), deque(maxlen=LEARN_BLOCKS)
        for blk in blocks:  # the first may have begun before rtsort joined: whole blocks only
            if len(blk.columns) == len(channels):
                self._emit_block(blk)
            elif self.next_sample is not None:
                self.incomplete_blocks += 1

    def _emit_block(self, blk: _Block) -> None:
        samples = np.empty((blk.n, len(self._columns)), np.float32)
        for ch, x in blk.columns.items():
            samples[:, self._columns[ch]] = x
        self._emit(blk.first, samples, blk.t_sent)

    def _emit(self, first: int, samples: np.ndarray, t_last: float) -> None:
        n = samples.shape[0]
        if n == 0:
            return
        if self._restarted(first):  # (a block learnt before its restart was seen)
            self._restart(first)
        if self.next_sample is not None and first > self.next_sample:
            self.gaps.append((self.next_sample + self._offset, first + self._offset))
            log.warning("%s: %d samples missing before sample %d", self.address, first - self.next_sample,
                        first + self._offset)
        self.next_sample = first + n
        self.n_samples += n
        self._last_arrival = now()
        self._ready.append(Chunk(samples, first_sample=first + self._offset,
                                 timestamp=t_last - (n - 1) / self.sampling_rate))

    def stats(self) -> dict:
        out = {"layout": self.layout, "stream": self.stream_name, "lost_messages": self.lost_messages,
               "incomplete_blocks": self.incomplete_blocks, "restarts": self.restarts, "events": self.events}
        if self.heartbeat is not None:
            out["heartbeat"] = self.heartbeat.stats()
        return out

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close()
        self.socket.close(0)
        log.info("%s: %d samples (%s layout); %d messages lost, %d buffers dropped for a lost channel, %d restarts, "
                 "%d EVENT messages; malformed %s; heartbeat %s", self.address, self.n_samples, self.layout,
                 self.lost_messages, self.incomplete_blocks, self.restarts, self.events, dict(self.malformed) or 0,
                 self.heartbeat.stats() if self.heartbeat is not None else "off")


# ---------------------------------------------------------------------------- sink
EXTRA_FIELDS = ("latency_ms", "confidence", "flags")  # the second wave's event fields, when the spikes carry them


def spike_messages(spikes: np.ndarray, timestamps: np.ndarray, sampling_rate: float, stream: str = APPLICATION,
                   source_node: int = 0) -> list:
    """The Event Broadcaster's JSON spike message (two frames) for each spike.

    ``sorted_id`` is the rtsort unit (-1: unassigned), ``electrode`` the peak
    channel's name as the GUI names continuous channels (``CH1`` = channel 0),
    ``amp1`` the trough depth in uV (positive, as the broadcaster's
    ``-data[peak]``); ``unit``, ``channel`` (0-based peak channel) and
    ``timestamp`` (the trough's time on the stream clock, null if unknown)
    follow.
    """
    extra = [f for f in EXTRA_FIELDS if f in (spikes.dtype.names or ())]
    out = []
    fs = float(sampling_rate)
    ts = np.asarray(timestamps, dtype=np.float64)
    for i, (s, u, ch, a) in enumerate(zip(spikes["sample_index"].tolist(), spikes["unit"].tolist(),
                                          spikes["channel"].tolist(), spikes["amplitude"].tolist())):
        t = float(ts[i]) if ts.ndim and math.isfinite(ts[i]) else None
        msg = {"event_type": "spike", "stream": stream, "source_node": source_node, "electrode": f"CH{ch + 1}",
               "num_channels": 1, "sample_rate": fs, "sample_number": s, "sorted_id": u, "amp1": -a,
               "unit": u, "channel": ch, "timestamp": t}
        for f in extra:
            v = spikes[f][i].item()
            msg[f] = v if not isinstance(v, float) or math.isfinite(v) else None
        out.append([SPIKE_CLASS, json.dumps(msg).encode()])
    return out


class OpenEphysSpikeSink:
    """Publish each spike as an Event Broadcaster JSON spike message on a PUB socket rtsort binds."""

    def __init__(self, uri: str, sampling_rate: float):
        self.pub = ZmqPublisher(uri.partition("?")[0])
        self.sampling_rate = float(sampling_rate)

    @property
    def dropped(self) -> int:
        return self.pub.dropped

    def write(self, spikes: np.ndarray, timestamps: np.ndarray, latency_ms: np.ndarray | None = None) -> None:
        for frames in spike_messages(spikes, timestamps, self.sampling_rate):
            self.pub.send(frames)

    def close(self) -> None:
        self.pub.close()

