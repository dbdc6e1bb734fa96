"""Beyond one process: many sessions (``rtsort batch``) and one long recording in time blocks
(``rtsort sort --workers``), on Dask.

Dask (``pip install 'rtsort[scale]'``) is imported here only, inside the
functions that need it: the runtime (``rtsort.pipeline``) never loads it.
``scheduler="local"`` starts a ``LocalCluster`` of worker processes (one
thread each) bound to 127.0.0.1 with no dashboard; ``tcp://HOST:8786``
connects to a running scheduler (``dask scheduler``, dask-jobqueue on SLURM),
whose workers must see the same paths.

Sessions. Each ``[[session]]`` of SESSIONS.toml is one task: ``train_bundle``
and ``sort_recording``, the very calls of ``rtsort train`` and ``rtsort sort``,
so a session's bundle and spikes are those the two commands give on it alone.
A finished session leaves ``DIR/NAME/done.json``: the identity of its inputs
(recording path, size and mtime, the config file's text, seed, the given
bundle's manifest hash) and the sha256 of its bundle manifest and spikes
file. A later run skips the sessions whose ``done.json`` still matches and
redoes the rest.

Time blocks. The recording is cut into blocks; a worker runs the runtime
:class:`~rtsort.pipeline.Pipeline` from ``margin`` samples before its block
(``reset`` there, so sample indices stay absolute), keeps the spikes whose
trough lies in the block proper and reads on past the block's end until
every spike with a trough in it has left (the pipeline's declared wait). The
margin is ``max(2 s, 5 x motion.tau_s)`` (2 s when motion correction is off)
rounded up to whole ``motion.step_s`` steps, and blocks start on step
boundaries, so the motion tracker updates at the very samples the serial sort
updates at and forgets its different start (its memory decays as
``exp(-t / tau_s)``); 2 s is hundreds of times what the filters, the detector,
the snippets, the late-phase rule and the peeler carry over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import ConfigError, RtsortError

log = logging.getLogger("rtsort.scale")

EXTRA_HINT = "pip install 'rtsort[scale]'"
# every worker computes on one core: no library spreads threads over the others' cores
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1"}
MIN_MARGIN_S = 2.0
MOTION_MARGIN_TAUS = 5.0
SESSION_KEYS = ("recording", "name", "bundle", "config", "seed")
DONE = "done.json"
SUMMARY = "summary.json"


# ---------------------------------------------------------------- Dask
def require_dask() -> None:
    """Raise a one-line RtsortError naming the extra when Dask's distributed scheduler is not installed."""
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as exc:
        raise RtsortError(f"this command needs Dask ({exc}): {EXTRA_HINT}") from None


@contextmanager
def _quiet(name: str = "distributed", level: int = logging.ERROR):
    """Dask's own INFO chatter (workers starting, comms closing) off the terminal while a client is up."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


def _fast_exit_plugin():
    from distributed.diagnostics.plugin import WorkerPlugin

    class FastExit(WorkerPlugin):
        """A LocalCluster's worker process leaves at once when closed: its results are gathered, and tearing
        torch, onnxruntime and numba down takes seconds (the nanny would kill it after 4 s anyway)."""

        name = "rtsort-fast-exit"

        def teardown(self, worker):
            import multiprocessing.util

            multiprocessing.util._exit_function()  # what exit would do for semaphores and queues (cheap)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    return FastExit()


@contextmanager
def dask_client(scheduler: str | None = "local", workers: int | None = None):
    """A ``distributed.Client``: on a LocalCluster of ``workers`` processes (``scheduler`` "local" or None), or on
    the running scheduler at ``scheduler`` (tcp://HOST:PORT; ``workers`` is then the scheduler's business)."""
    require_dask()
    import dask
    from distributed import Client, LocalCluster

    scheduler = scheduler or "local"
    if scheduler != "local" and not scheduler.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        raise ConfigError(f"--scheduler must be 'local' or a scheduler address such as tcp://HOST:8786, "
                          f"got {scheduler!r}")
    with _quiet():
        if scheduler != "local":
            try:
                client = Client(scheduler, timeout="20s")
            except OSError as exc:
                raise RtsortError(f"cannot reach the Dask scheduler at {scheduler} ({exc})") from None
            try:
                yield client
            finally:
                client.close()
            return
        n = max(1, int(workers or os.cpu_count() or 1))
        env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_ENV}
        if os.environ.get("NUMBA_CACHE_DIR"):  # rtsort's import set it: the workers share the compiled kernels
            env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
        # workers may start processes of their own (joblib in training); loopback only: no dashboard (Dask has no
        # setting for its address, hence the argument) and scheduler, nannies, workers and their HTTP routes on
        # 127.0.0.1
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env, "distributed.worker.daemon": False}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None, worker_dashboard_address=None,
                                   silence_logs=logging.ERROR)
        try:
            with Client(cluster) as client:
                client.register_plugin(_fast_exit_plugin())
                yield client
        finally:
            cluster.close()


def _limit_threads() -> None:
    """Inside a task: one thread per library for what loads from here on (a remote worker was started without
    the LocalCluster's environment)."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else ""
    if isinstance(exc, RtsortError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------- sessions
def read_sessions(path: str | Path) -> list[dict]:
    """SESSIONS.toml -> one dict per ``[[session]]``: recording, name, bundle, config (absolute paths; relative
    ones resolve against the TOML's folder), seed."""
    from .config import tomllib

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: sessions file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    extra = sorted(set(data) - {"session"})
    if extra:
        raise ConfigError(f"{path}: unknown table(s) {extra}; a sessions file holds [[session]] tables only")
    tables = data.get("session")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: no [[session]] tables (each needs recording = \"PATH\")")
    base = path.resolve().parent
    out, names = [], {}
    for i, t in enumerate(tables, 1):
        where = f"{path}: session {i}"
        unknown = sorted(set(t) - set(SESSION_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(SESSION_KEYS)}")
        if not isinstance(t.get("recording"), str) or not t["recording"]:
            raise ConfigError(f"{where}: 'recording' (a path) is required")
        s = {"recording": str(base / Path(t["recording"]).expanduser())}
        for key in ("bundle", "config"):
            if key in t:
                if not isinstance(t[key], str) or not t[key]:
                    raise ConfigError(f"{where}: '{key}' must be a path")
                s[key] = str(base / Path(t[key]).expanduser())
            else:
                s[key] = None
        seed = t.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{where}: 'seed' must be an integer, got {seed!r}")
        s["seed"] = seed
        name = t.get("name", Path(t["recording"]).stem)
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ConfigError(f"{where}: 'name' must be a plain folder name, got {name!r}")
        if name in names:
            raise ConfigError(f"{where}: name {name!r} is taken by session {names[name]} (give each a 'name')")
        names[name] = i
        s["name"] = name
        out.append(s)
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stat(path: Path) -> dict:
    """Size and mtime of a file, or summed / newest over a folder's files."""
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file()]
        return {"size": int(sum(p.stat().st_size for p in files)),
                "mtime_ns": int(max((p.stat().st_mtime_ns for p in files), default=0))}
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def session_identity(session: dict) -> dict | None:
    """What a session's outputs depend on (JSON-ready), or None when an input cannot be read (the task then
    reports why)."""
    try:
        rec = Path(session["recording"]).resolve()
        ident = {"recording": str(rec), **_stat(rec)}
        side = rec.with_suffix(".json")
        if rec.suffix == ".bin" and side.exists():
            ident["sidecar"] = _stat(side)
        ident["config_text"] = Path(session["config"]).read_text() if session["config"] else ""
        ident["seed"] = int(session["seed"])
        ident["bundle_manifest_sha256"] = (_file_sha256(Path(session["bundle"]) / "manifest.json")
                                           if session["bundle"] else None)
    except OSError:
        return None
    return json.loads(json.dumps(ident))


def _outputs(out: Path, session: dict) -> tuple[Path, Path]:
    bundle = Path(session["bundle"]) if session["bundle"] else out / "bundle"
    return bundle / "manifest.json", out / "spikes.npz"


def completed(out: Path, session: dict, identity: dict | None) -> dict | None:
    """The stored summary when ``out/done.json`` matches the inputs' identity and the outputs' hashes; else None."""
    if identity is None:
        return None
    try:
        done = json.loads((out / DONE).read_text())
        if done.get("inputs") != identity:
            return None
        manifest, spikes = _outputs(out, session)
        if _file_sha256(manifest) != done["outputs"]["manifest_sha256"] or \
                _file_sha256(spikes) != done["outputs"]["spikes_sha256"]:
            return None
        return dict(done["summary"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_session(session: dict, identity: dict | None, out_dir: str) -> dict:
    """One session, on a worker: train (unless it names a bundle), sort, write the outputs and ``done.json``.
    Returns its summary; a failure is reported in it (status "failed", a one-line error), never raised."""
    t0 = time.perf_counter()
    out = Path(out_dir) / session["name"]
    row = {"name": session["name"], "recording": session["recording"], "status": "failed", "units": None,
           "good_units": None, "spikes": None, "unassigned": None, "wall_s": None, "error": None}
    try:
        _limit_threads()
        from .bundle import load_bundle
        from .config import load_config
        from .io import open_recording, save_spikes
        from .pipeline import sort_recording

        out.mkdir(parents=True, exist_ok=True)
        (out / DONE).unlink(missing_ok=True)
        config = load_config(session["config"])
        rec = open_recording(session["recording"])
        if session["bundle"]:
            bundle_dir = Path(session["bundle"])
            units = load_bundle(bundle_dir).units
        else:
            try:
                import torch

                from .train import train_bundle
            except ImportError as exc:
                raise RtsortError(f"training needs the 'train' extra ({exc}): pip install 'rtsort[train]'") \
                    from None
            torch.set_num_threads(1)  # the fit itself uses [train] threads, as 'rtsort train' does
            bundle_dir = out / "bundle"
            if bundle_dir.exists():
                shutil.rmtree(bundle_dir)
            result = train_bundle(rec, bundle_dir, config, seed=session["seed"], progress=False)
            units = result.units
            row["train_s"] = round(result.timings["total_s"], 3)
        spikes, row["sort_s"] = sort_recording(rec, bundle_dir, progress=False)
        save_spikes(out / "spikes.npz", spikes, rec.sampling_rate)
        row.update(status="done", bundle=str(bundle_dir), spikes_file=str(out / "spikes.npz"), units=len(units),
                   good_units=sum(1 for u in units if not u.get("flags")), spikes=int(spikes.size),
                   unassigned=int(np.count_nonzero(spikes["unit"] < 0)),
                   duration_s=float(rec.duration_s))
        row["wall_s"] = round(time.perf_counter() - t0, 3)
        if identity is not None:
            manifest, spikes_file = _outputs(out, session)
            done = {"inputs": identity, "summary": row,
                    "outputs": {"manifest_sha256": _file_sha256(manifest),
                                "spikes_sha256": _file_sha256(spikes_file)}}
            tmp = out / (DONE + ".tmp")
            tmp.write_text(json.dumps(done, indent=1) + "\n")
            tmp.replace(out / DONE)
    except Exception as exc:  # one session's failure never stops the others
        row.update(status="failed", error=_one_line(exc), wall_s=round(time.perf_counter() - t0, 3))
    return row


def run_batch(sessions_path: str | Path, out_dir: str | Path, scheduler: str | None = "local",
              workers: int | None = None, progress: bool = True) -> dict:
    """Train and sort every session of SESSIONS.toml as a Dask task; write ``DIR/summary.json`` and return it.

    ``workers``: LocalCluster processes (default: one per core, at most one per session to run). Sessions whose
    ``done.json`` matches are skipped without starting a cluster.
    """
    from tqdm import tqdm

    sessions = read_sessions(sessions_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    todo = []
    for s in sessions:
        ident = session_identity(s)
        cached = completed(out_dir / s["name"], s, ident)
        if cached is not None:
            rows[s["name"]] = {**cached, "status": "skipped", "error": None}
        else:
            todo.append((s, ident))
    if todo:
        require_dask()
        from distributed import as_completed

        n = workers or min(len(todo), os.cpu_count() or 1)
        with dask_client(scheduler, n) as client:
            run = uuid.uuid4().hex[:8]
            futures = {client.submit(run_session, s, ident, str(out_dir.resolve()), pure=False,
                                     key=f"rtsort-session-{s['name']}-{run}"): s for s, ident in todo}
            for fut in tqdm(as_completed(futures), total=len(futures), desc="sessions", unit="session",
                            disable=not progress, leave=False):
                s = futures[fut]
                try:
                    row = fut.result()
                except Exception as exc:  # the task itself never raises: a worker died, a scheduler went away
                    row = {"name": s["name"], "recording": s["recording"], "status": "failed", "units": None,
                           "good_units": None, "spikes": None, "unassigned": None, "wall_s": None,
                           "error": _one_line(exc)}
                rows[s["name"]] = row
                log.info("session %s: %s", s["name"], row["status"])
    summary = {"sessions_file": str(Path(sessions_path).resolve()), "out": str(out_dir.resolve()),
               "scheduler": scheduler or "local", "workers": (workers or min(len(todo), os.cpu_count() or 1))
               if todo else 0, "wall_s": round(time.perf_counter() - t0, 3),
               "failed": sum(1 for r in rows.values() if r["status"] == "failed"),
               "sessions": [rows[s["name"]] for s in sessions]}
    tmp = out_dir / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out_dir / SUMMARY)
    return summary


# ---------------------------------------------------------------- time blocks
def block_margin(bundle, seconds: float | None = None) -> int:
    """Samples of warm-up before a block: ``seconds``, by default ``max(2 s, 5 x motion.tau_s)`` (2 s without
    motion correction), rounded up to whole ``motion.step_s`` steps."""
    from .motion import motion_enabled

    cfg = bundle.config.motion
    fs = bundle.sampling_rate
    if seconds is None:
        seconds = MIN_MARGIN_S
        if motion_enabled(cfg, bundle.probe) and bundle.motion_reference is not None:
            seconds = max(seconds, MOTION_MARGIN_TAUS * cfg.tau_s)
    step = motion_step(bundle)
    return int(math.ceil(seconds * fs / step)) * step


def motion_step(bundle) -> int:
    """The motion tracker's step in samples (its updates fall on multiples of it)."""
    return max(1, int(round(bundle.config.motion.step_s * bundle.sampling_rate)))


def plan_blocks(n_samples: int, n_blocks: int, step: int, margin: int) -> list[tuple[int, int, int]]:
    """``n_blocks`` consecutive blocks as (first sample fed, block start, block stop); starts on ``step``
    boundaries, the first fed sample ``margin`` before the start (0 for the first block)."""
    per = max(step, int(math.ceil(n_samples / max(1, n_blocks) / step)) * step)
    starts = list(range(0, n_samples, per)) or [0]
    return [(max(0, a - margin), a, min(n_samples, a + per)) for a in starts]


def sort_block(recording_path: str, bundle_path: str, first: int, start: int, stop: int, chunk: int,
               threads: int = 1, track_rate: float | None = None):
    """On a worker: run the runtime's pipeline from sample ``first`` until every spike with a trough in
    [start, stop) has left; return (those spikes, counters)."""
    _limit_threads()
    from .bundle import load_bundle
    from .io import open_recording
    from .pipeline import Pipeline
    from .types import SPIKE_DTYPE

    t0, c0 = time.perf_counter(), time.process_time()
    first = max(0, int(first))
    rec = open_recording(recording_path)
    pipe = Pipeline(load_bundle(bundle_path), rec.gains_to_uV, rec.offsets_to_uV, threads, track_rate)
    pipe.warmup()
    pipe.reset(first)
    t_ready = time.perf_counter()
    # the last spike with a trough before `stop` leaves within the pipeline's longest wait
    wait = pipe.front.snippets.max_wait
    if pipe.peeler is not None:
        wait = max(wait, pipe.peeler.max_wait)
    end = min(rec.n_samples, stop + wait + chunk)
    pieces = []
    for a in range(first, end, chunk):
        pieces.append(pipe.process(rec.get_traces(a, min(a + chunk, end))))
    spikes = np.concatenate(pieces) if pieces else np.zeros(0, SPIKE_DTYPE)
    inside = (spikes["sample_index"] >= start) & (spikes["sample_index"] < stop)
    stats = {"first": first, "start": start, "stop": stop, "end": end, "spikes": int(np.count_nonzero(inside)),
             "margin_spikes": int(np.count_nonzero(spikes["sample_index"] < start)),
             "setup_s": t_ready - t0, "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    return spikes[inside], stats


def sort_blocks(recording_path: str | Path, bundle_path: str | Path, workers: int | None = None,
                scheduler: str | None = "local", chunk_s: float = 1.0, threads: int = 1,
                track_rate: float | None = None, block_s: float | None = None, margin_s: float | None = None,
                progress: bool = True):
    """Sort one recording in time blocks on Dask workers and stitch the spikes in order.

    ``block_s``: block length (default: one block per worker); ``margin_s``: warm-up before each block (default
    :func:`block_margin`'s).

    Returns
    -------
    spikes : ndarray of SPIKE_DTYPE, in (sample_index, channel) order as :func:`rtsort.pipeline.sort_recording`
    info : dict
        blocks, margin_s, workers, seconds (wall, cluster start included) and per-block counters.
    """
    require_dask()
    from distributed import as_completed
    from tqdm import tqdm

    from .bundle import load_bundle
    from .io import open_recording
    from .types import SPIKE_DTYPE

    recording_path = Path(recording_path).resolve()
    rec = open_recording(recording_path)
    bundle = load_bundle(bundle_path)
    bundle.check_recording(rec)
    rate = bundle.config.assign.track_rate if track_rate is None else track_rate
    if rate and rate > 0:
        raise ConfigError(f"--workers: centroid tracking (track_rate {rate:g}) carries the centroids through the "
                          f"whole recording, so time blocks cannot reproduce it; sort without --workers")
    fs = rec.sampling_rate
    margin, step = block_margin(bundle, margin_s), motion_step(bundle)
    chunk = max(1, int(chunk_s * fs))
    t0 = time.perf_counter()
    with dask_client(scheduler, workers) as client:
        n_workers = max(1, sum(client.nthreads().values()))
        n_blocks = n_workers if block_s is None else int(math.ceil(rec.n_samples / (block_s * fs)))
        blocks = plan_blocks(rec.n_samples, n_blocks, step, margin)
        run = uuid.uuid4().hex[:8]
        futures = {client.submit(sort_block, str(recording_path), str(Path(bundle_path).resolve()), first, start,
                                 stop, chunk, threads, track_rate, pure=False, key=f"rtsort-block-{i}-{run}"): i
                   for i, (first, start, stop) in enumerate(blocks)}
        results = {}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="sort blocks", unit="block",
                        disable=not progress, leave=False):
            results[futures[fut]] = fut.result()  # a worker's RtsortError arrives as itself
    pieces = [results[i][0] for i in range(len(blocks))]
    spikes = np.concatenate(pieces) if pieces else np.zeros(0, SPIKE_DTYPE)
    spikes = spikes[np.lexsort((spikes["channel"], spikes["sample_index"]))]
    dt = time.perf_counter() - t0
    info = {"sampling_rate": fs, "duration_s": rec.duration_s, "n_channels": rec.n_channels,
            "blocks": len(blocks), "workers": n_workers, "margin_s": margin / fs,
            "block_s": (blocks[0][2] - blocks[0][1]) / fs, "seconds": dt,
            "per_block": [results[i][1] for i in range(len(blocks))]}
    log.info("sorted %.1f s of %d channels in %d blocks on %d workers (margin %.1f s) in %.1f s: %d spikes",
             rec.duration_s, rec.n_channels, len(blocks), n_workers, margin / fs, dt, spikes.size)
    return spikes, info


def compare_spikes(serial: np.ndarray, stitched: np.ndarray, boundaries=(), margin: int = 0) -> dict:
    """How two sorts of a recording differ: spikes in one but not the other (by sample_index, channel and unit),
    and how many of those lie within ``margin`` samples after a block boundary."""
    def keys(s):
        return set(zip(s["sample_index"].tolist(), s["channel"].tolist(), s["unit"].tolist()))

    a, b = keys(serial), keys(stitched)
    diff = sorted(a ^ b)
    bounds = np.asarray(sorted(boundaries), np.int64)

    def near(t):
        if bounds.size == 0:
            return False
        return bool(np.any((t >= bounds - margin) & (t < bounds + margin)))

    return {"serial": len(a), "stitched": len(b), "only_serial": len(a - b), "only_stitched": len(b - a),
            "differ": len(diff), "fraction": len(diff) / max(1, len(a)),
            "within_margins": sum(1 for t, _, _ in diff if near(t))}
