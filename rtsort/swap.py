"""A curated bundle taking over a live run between two chunks, with no restart and no sample lost.

``rtsort run --bundle B --watch-bundle DIR`` looks at ``DIR/manifest.json``
once a second (:class:`BundleWatcher`). When a bundle is written there
(``rtsort curate ... --out DIR``; the manifest is written last, and a bundle
whose files do not match their checksums yet is tried again a second later),
a thread loads it and builds its pipeline on the running front end, so the
stream is never held up by the load. The curated bundle must share the
running one's preprocessing, detection, snippets, motion correction, probe
and noise levels (curation changes only the units); one that does not is
refused with the differences named, and the run goes on with its bundle.

The takeover (:class:`SwappingSorter`) is exact at a cut sample ``S``: every
spike whose trough is before ``S`` is labelled by the old bundle, every
spike at or after ``S`` by the new one, as if it had sorted the stream from
its start. Both share one front end (filters, detector, snippets and motion
tracker carry on as they were). The new bundle starts labelling at the first
sample ``S0`` of the chunk after it was ready, and ``S`` is one template plus
the new bundle's longest wait after ``S0``, so the new bundle's own history
(the late-phase rule, the residual pass) is complete at ``S``. The old
bundle labels until every spike before ``S`` has left, then is dropped. For
those few milliseconds both bundles label the chunks: twice the labelling
cost, no other.

Unit numbers are the new bundle's from ``S`` on (curation renumbers units):
each swap is logged with its cut sample, and listed in the run's statistics
(``swaps``) with the bundle's path, manifest digest and unit count.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from .bundle import Bundle, load_bundle, manifest_digest
from .errors import RtsortError

log = logging.getLogger("rtsort.swap")

POLL_S = 1.0
FRONT_SECTIONS = ("preprocess", "detect", "snippets", "motion")
# the pipeline's running counts that a swap hands on (spikes and unassigned spikes are counted as they leave)
COUNTS = ("n_skipped", "n_candidates_claimed", "n_candidates_dropped", "n_tails")


def differences(old: Bundle, new: Bundle) -> list[str]:
    """What keeps ``new`` from sharing ``old``'s front end: one line per difference (none: it can take over)."""
    out = []
    if old.sampling_rate != new.sampling_rate:
        out.append(f"sampling rate {old.sampling_rate:g} Hz against {new.sampling_rate:g} Hz")
    if list(old.probe.channel_ids) != list(new.probe.channel_ids) or not np.allclose(
            old.probe.positions_um, new.probe.positions_um):
        out.append("the probe (channel ids or positions)")
    a, b = old.config.to_dict(), new.config.to_dict()
    for section in FRONT_SECTIONS:
        for key in sorted(set(a[section]) | set(b[section])):
            if a[section].get(key) != b[section].get(key):
                out.append(f"[{section}] {key}: {a[section].get(key)!r} against {b[section].get(key)!r}")
    if not np.array_equal(old.noise_levels, new.noise_levels, equal_nan=True):
        out.append("the noise levels")
    ra, rb = old.motion_reference, new.motion_reference
    if (ra is None) != (rb is None) or (ra is not None and not np.array_equal(ra, rb)):
        out.append("the motion reference")
    return out


def _digest(bundle_dir: Path) -> str | None:
    """:func:`rtsort.bundle.manifest_digest`, or None while the directory has no manifest."""
    try:
        return manifest_digest(bundle_dir)
    except OSError:
        return None


class BundleWatcher:
    """Watch a directory for a new bundle and build its pipeline in a thread (see the module docstring).

    ``build(bundle)`` makes the pipeline (on the running front end) or raises
    RtsortError with a one-line reason; ``accepts(bundle)`` lists what keeps a
    bundle out (:func:`differences` against the bundle running at the time).
    :meth:`take` hands over the newest built pipeline, once.
    """

    def __init__(self, path: str | Path, build, accepts, poll_s: float | None = None):
        self.path = Path(path)
        self.build = build
        self.accepts = accepts
        self.poll_s = float(POLL_S if poll_s is None else poll_s)
        self.seen = _digest(self.path)  # a bundle already there when the run starts is not news
        self.refused = 0
        self._ready = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtsort-bundle-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failed = None  # the digest of a manifest that did not load: tried again while it stays, logged once
        while not self._stop.wait(self.poll_s):
            digest = _digest(self.path)
            if digest is None or digest == self.seen:
                continue
            try:
                bundle = load_bundle(self.path)
                why = self.accepts(bundle)
                if why:
                    self.seen = digest
                    log.error("%s: not swapped in, it does not share the running bundle's front end: %s; the run "
                              "goes on with its bundle", self.path, "; ".join(why))
                    self.refused += 1  # after the log: a reader that sees the count finds the reason logged
                    continue
                pipe = self.build(bundle)
            except RtsortError as exc:  # half written (checksums), or not a bundle: again at the next look
                if failed != digest:
                    log.warning("%s: not loaded yet (%s)", self.path, exc)
                    failed = digest
                continue
            self.seen = digest
            with self._lock:
                self._ready = (pipe, digest)
            log.info("%s: curated bundle loaded (%d units); it takes over at the next chunk", self.path,
                     bundle.n_units)

    def take(self):
        """The pipeline built since the last call and its manifest digest, or None."""
        if self._ready is None:
            return None
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60.0)


class SwappingSorter:
    """A live pipeline that another bundle can take over between two chunks (see the module docstring).

    It offers what ``run_stream`` reads of a :class:`rtsort.pipeline.Pipeline`:
    ``process``, ``reset``, ``front``, ``last_filtered``, ``last_peeled``,
    ``stage_ns`` and :meth:`counts`.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.front = pipe.front
        self.stage_ns = pipe.stage_ns
        self.last_filtered = None
        self.last_peeled = 0
        self.n_spikes = 0
        self.n_unassigned = 0
        self.swaps = []  # one dict per completed or started swap
        self._next = None  # the pipeline taking over, while it does
        self._cut = self._retire = 0
        self._done = dict.fromkeys(COUNTS, 0)  # counts of pipelines no longer counting
        self._done["n_peeled"] = 0
        self._from = self._own(pipe)  # the counting pipeline's counts when it began to count
        self._counting = pipe

    @property
    def bundle(self):
        return self.pipe.bundle

    @property
    def swapping(self) -> bool:
        """A bundle is taking over (both label the chunks)."""
        return self._next is not None

    @staticmethod
    def _own(p) -> dict:
        c = {k: getattr(p, k) for k in COUNTS}
        c["n_peeled"] = p.peeler.n_peeled if p.peeler is not None else 0
        return c

    def counts(self) -> dict:
        """The run's counts: spikes, unassigned, skipped_encoding, candidates_claimed, candidates_dropped,
        tails_dropped, peeled (each chunk counted by the one bundle whose spikes it held)."""
        now = self._own(self._counting)
        c = {k: self._done[k] + now[k] - self._from[k] for k in self._done}
        return {"spikes": self.n_spikes, "unassigned": self.n_unassigned, "skipped_encoding": c["n_skipped"],
                "candidates_claimed": c["n_candidates_claimed"], "candidates_dropped": c["n_candidates_dropped"],
                "tails_dropped": c["n_tails"], "peeled": c["n_peeled"]}

    def _count_from(self, p) -> None:
        now = self._own(self._counting)
        for k in self._done:
            self._done[k] += now[k] - self._from[k]
        self._counting, self._from = p, self._own(p)

    def begin(self, pipe, path: str = "", digest: str = "") -> None:
        """``pipe`` (built on this sorter's front end) takes over from the next chunk on."""
        if self._next is not None:
            raise RuntimeError("a bundle is already taking over: begin() again once `swapping` is False")
        first_sample = self.front.next_sample
        old = self.pipe
        wait_new = pipe.front.snippets.max_wait + (pipe.peeler.max_wait if pipe.peeler is not None else 0)
        self._cut = int(first_sample) + pipe.bundle.templates.shape[1] + wait_new
        self._retire = self._cut + old.front.snippets.max_wait + (
            old.peeler.max_wait if old.peeler is not None else 0)
        pipe.late_phase.reset()
        if pipe.peeler is not None:
            pipe.peeler.reset(first_sample)
        self._next = pipe
        self.swaps.append({"sample_index": self._cut, "bundle": path, "manifest_sha256": digest,
                           "units": pipe.bundle.n_units})
        log.info("bundle %s (%d units) labels the spikes from sample %d on; %s (%d units) those before", path,
                 pipe.bundle.n_units, self._cut, old.bundle.path, old.bundle.n_units)

    def _finish(self) -> None:
        """The new pipeline alone from now on."""
        if self._counting is not self._next:
            self._count_from(self._next)
        self.pipe, self._next = self._next, None
        self.stage_ns = self.pipe.stage_ns
        log.info("bundle swap done at sample %d: %s (%d units) labels every spike", self._cut, self.pipe.bundle.path,
                 self.pipe.bundle.n_units)

    def reset(self, first_sample: int = 0) -> None:
        """A gap: a swap under way completes at once (there are no spikes in flight across a gap)."""
        if self._next is not None:
            self._finish()
        self.pipe.reset(first_sample)

    def process(self, samples: np.ndarray, encode: bool = True) -> np.ndarray:
        """One chunk of raw samples -> the spikes it completed (``Pipeline.process``), across a swap too."""
        if self._next is None:
            spikes = self.pipe.process(samples, encode)
            self.last_filtered, self.last_peeled = self.pipe.last_filtered, self.pipe.last_peeled
            self._count(spikes)
            return spikes
        old, new = self.pipe, self._next
        first = self.front.next_sample
        last = first + samples.shape[0] - 1
        if self._counting is old and last >= self._cut:  # this chunk's counts are the new bundle's
            self._count_from(new)
        filtered = self.last_filtered = old.preprocess(samples)
        out = old.front_pass(filtered)  # one front end: its stages are counted once
        a = old.peel(*old.label_pass(out, encode), encode)
        b = new.peel(*new.label_pass(out, encode), encode)
        # each bundle's own spikes: the old one's before the cut, the new one's from it; peeled spikes last
        a_first, a_late = a[: a.size - old.last_peeled], a[a.size - old.last_peeled:]
        b_first, b_late = b[: b.size - new.last_peeled], b[b.size - new.last_peeled:]
        parts = [a_first[a_first["sample_index"] < self._cut], b_first[b_first["sample_index"] >= self._cut],
                 a_late[a_late["sample_index"] < self._cut], b_late[b_late["sample_index"] >= self._cut]]
        spikes = np.concatenate(parts)
        self.last_peeled = parts[2].size + parts[3].size
        self.stage_ns = old.stage_ns + new.stage_ns
        self.stage_ns[:3] = old.stage_ns[:3]
        if first > self._retire:  # every spike before the cut has left (a chunk's length to spare)
            self._finish()
        self._count(spikes)
        return spikes

    def _count(self, spikes: np.ndarray) -> None:
        self.n_spikes += spikes.size
        self.n_unassigned += int(np.count_nonzero(spikes["unit"] < 0))
