"""Beyond one process (rtsort.scale): many sessions on Dask (`rtsort batch`), one recording in time blocks
(`rtsort sort --workers / --scheduler`), one `rtsort run` per probe side by side; Dask stays out of the runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("distributed")

from rtsort.cli import main  # noqa: E402
from rtsort.config import Config  # noqa: E402
from rtsort.io import load_spikes  # noqa: E402
from rtsort.scale import (  # noqa: E402
    block_margin,
    compare_spikes,
    completed,
    dask_client,
    plan_blocks,
    read_sessions,
    session_identity,
)

# a short Transformer fit on one thread (the same bundle in a worker and in `rtsort train`, and quick); PCA
# features for the other session (no torch: the cheaper path, and a second config)
SMALL = "[train]\nepochs = 4\nmax_snippets = 1500\npatience = 2\nthreads = 1\n"
PCA = "[train]\nfeatures = \"pca\"\n"


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory):
    """Three sessions: a (16 ch) and c (24 ch, seed 1) simulated for 10 s, b a copy of a's recording cut to an odd
    number of bytes (corrupt)."""
    from rtsort.sim import simulate

    root = tmp_path_factory.mktemp("batch")
    simulate(root / "a", n_channels=16, n_units=5, duration_s=10.0, seed=1, progress=False)
    simulate(root / "c", n_channels=24, n_units=5, duration_s=10.0, seed=3, progress=False)
    (root / "b").mkdir()
    shutil.copy(root / "a/recording.json", root / "b/recording.json")
    data = (root / "a/recording.bin").read_bytes()
    (root / "b/recording.bin").write_bytes(data[:-1])
    (root / "small.toml").write_text(SMALL)
    (root / "pca.toml").write_text(PCA)
    (root / "sessions.toml").write_text(
        '[[session]]\nrecording = "a/recording.bin"\nname = "a"\nconfig = "small.toml"\n\n'
        '[[session]]\nrecording = "b/recording.bin"\nname = "b"\nconfig = "small.toml"\n\n'
        '[[session]]\nrecording = "c/recording.bin"\nname = "c"\nconfig = "pca.toml"\nseed = 1\n')
    return root


@pytest.fixture(scope="module")
def batch_run(batch_dir):
    """`rtsort batch` on a LocalCluster of two workers: (exit code, stdout, stderr, output folder)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["-q", "batch", str(batch_dir / "sessions.toml"), "--out", str(batch_dir / "out"),
                   "--workers", "2"])
    return rc, out.getvalue(), err.getvalue(), batch_dir / "out"


def test_batch_sorts_every_session_and_reports_the_corrupt_one(batch_run):
    rc, out, err, d = batch_run
    assert rc == 1, (out, err)
    summary = json.loads((d / "summary.json").read_text())
    status = {r["name"]: r["status"] for r in summary["sessions"]}
    assert status == {"a": "done", "b": "failed", "c": "done"}
    b = next(r for r in summary["sessions"] if r["name"] == "b")
    assert "not a multiple" in b["error"] and "\n" not in b["error"]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rtsort batch: session b: error:"), err
    assert "Traceback" not in err
    for name in "ac":
        assert (d / name / "bundle/manifest.json").exists() and (d / name / "spikes.npz").exists()
        assert (d / name / "done.json").exists()
        assert f"  {name} " in out
    assert not (d / "b/done.json").exists()
    rows = {r["name"]: r for r in summary["sessions"]}
    assert rows["a"]["units"] > 0 and rows["a"]["spikes"] > 100


def test_batch_equals_train_and_sort_alone(batch_run, batch_dir, tmp_path):
    """Each session's bundle and spikes are those of `rtsort train` + `rtsort sort` on it alone."""
    d = batch_run[3]
    for name, seed, config in (("a", 0, "small.toml"), ("c", 1, "pca.toml")):
        rec = str(batch_dir / name / "recording.bin")
        bundle = tmp_path / name / "bundle"
        assert main(["-q", "train", rec, "--out", str(bundle), "--config", str(batch_dir / config),
                     "--seed", str(seed)]) == 0
        assert main(["-q", "sort", rec, "--bundle", str(bundle), "--out", str(tmp_path / name / "s.npz")]) == 0
        for f in ("centroids.npy", "centroid_unit.npy", "templates.npy"):
            assert np.array_equal(np.load(bundle / f), np.load(d / name / "bundle" / f)), (name, f)
        with np.load(tmp_path / name / "s.npz") as serial, np.load(d / name / "spikes.npz") as batch:
            assert sorted(serial.files) == sorted(batch.files)
            for k in serial.files:
                assert np.array_equal(serial[k], batch[k], equal_nan=True), (name, k)


def test_second_batch_run_skips_complete_sessions(batch_run, batch_dir, capsys):
    d = batch_run[3]
    before = {n: (d / n / "spikes.npz").stat().st_mtime_ns for n in "ac"}
    rc = main(["-q", "batch", str(batch_dir / "sessions.toml"), "--out", str(d), "--workers", "1"])
    assert rc == 1  # b is still corrupt: tried again, failed again
    status = {r["name"]: r["status"] for r in json.loads((d / "summary.json").read_text())["sessions"]}
    assert status == {"a": "skipped", "b": "failed", "c": "skipped"}
    assert {n: (d / n / "spikes.npz").stat().st_mtime_ns for n in "ac"} == before
    capsys.readouterr()


def test_done_json_checks_outputs_and_inputs(batch_run, batch_dir, tmp_path):
    """A session is complete only while its outputs' hashes and its inputs' identity still match."""
    d = batch_run[3]
    session = next(s for s in read_sessions(batch_dir / "sessions.toml") if s["name"] == "a")
    ident = session_identity(session)
    copy = tmp_path / "a"
    shutil.copytree(d / "a", copy)
    assert completed(copy, session, ident)["spikes"] > 100
    assert completed(copy, session, {**ident, "seed": 5}) is None  # other inputs
    assert completed(copy, session, {**ident, "config_text": ""}) is None
    assert completed(copy, session, {**ident, "mtime_ns": ident["mtime_ns"] + 1}) is None
    spikes = copy / "spikes.npz"
    spikes.write_bytes(spikes.read_bytes() + b"\0")  # a damaged output
    assert completed(copy, session, ident) is None


def test_sort_in_time_blocks_on_a_running_scheduler_matches_the_serial_sort(batch_run, batch_dir, tmp_path):
    """`rtsort sort --scheduler tcp://...` (blocks of 2.5 s, 2 s margins) against the serial sort: at most 0.1 %
    of the spikes differ, all within a margin of a block boundary (here: none). The cluster listens on loopback
    only."""
    import psutil

    d = batch_run[3]
    rec = str(batch_dir / "a/recording.bin")
    with dask_client("local", 2) as client:
        address = client.scheduler.address
        assert address.startswith("tcp://127.0.0.1:")
        procs = [psutil.Process()] + psutil.Process().children(recursive=True)
        listening = [c.laddr for p in procs for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
        rc = main(["-q", "sort", rec, "--bundle", str(d / "a/bundle"), "--out", str(tmp_path / "blocks.npz"),
                   "--scheduler", address, "--block-s", "2.5"])
    assert rc == 0
    serial, _ = load_spikes(d / "a/spikes.npz")
    stitched, fs = load_spikes(tmp_path / "blocks.npz")
    cmp = compare_spikes(serial, stitched, boundaries=[int(2.5 * fs * k) for k in (1, 2, 3)], margin=int(2 * fs))
    assert cmp["fraction"] <= 0.001 and cmp["within_margins"] == cmp["differ"], cmp
    assert stitched.size == serial.size
    for k in serial.dtype.names:  # in fact the same to the last bit
        assert np.array_equal(serial[k], stitched[k], equal_nan=True), k


def test_block_margins_follow_the_motion_tracker():
    """max(2 s, 5 x tau_s), rounded up to whole motion steps; blocks start on step boundaries and tile the
    recording."""
    from rtsort.types import Probe

    def bundle(mode, tau, step, span_um):
        cfg = Config.from_dict({"motion": {"mode": mode, "tau_s": tau, "step_s": step}})
        pos = np.stack([np.zeros(8), np.linspace(0, span_um, 8)], axis=1)
        return SimpleNamespace(config=cfg, sampling_rate=30000.0, probe=Probe(pos, tuple(map(str, range(8)))),
                               motion_reference=np.zeros((2, 2)))

    assert block_margin(bundle("auto", 1.0, 0.5, 600)) == 5 * 30000  # motion on: 5 tau
    assert block_margin(bundle("auto", 1.0, 0.5, 140)) == 2 * 30000  # a short probe: motion off, 2 s
    assert block_margin(bundle("rigid", 0.3, 0.5, 140)) == 2 * 30000
    assert block_margin(bundle("rigid", 1.1, 0.4, 140)) == 14 * 12000  # 5.5 s -> 14 steps of 0.4 s
    assert block_margin(bundle("auto", 1.0, 0.5, 600), 40.2) == 81 * 15000  # --margin-s, rounded up to a step
    blocks = plan_blocks(1_000_000, 3, 15000, 150000)
    assert blocks[0] == (0, 0, blocks[0][2])
    assert all(s % 15000 == 0 and f == max(0, s - 150000) for f, s, _ in blocks)
    assert [b[1] for b in blocks[1:]] == [b[2] for b in blocks[:-1]] and blocks[-1][2] == 1_000_000


# `rtsort run` in a process that then says whether Dask was ever imported (the runtime must stay free of it)
RUN_THEN_CHECK = ("import sys\nfrom rtsort.cli import main\nrc = main(sys.argv[1:])\n"
                  "assert 'rtsort.pipeline' in sys.modules\n"
                  "bad = [m for m in ('dask', 'distributed') if m in sys.modules]\n"
                  "assert not bad, f'the runtime imported {bad}'\nsys.exit(rc)\n")


def test_two_live_runs_side_by_side_match_sort_and_never_import_dask(batch_run, batch_dir, tmp_path):
    """One `rtsort run` per probe on one host: two processes at once give each probe's `rtsort sort` spikes; and
    neither process (rtsort.pipeline, the command line, the file source and sink) imports Dask."""
    d = batch_run[3]
    procs = {}
    for name in "ac":
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", RUN_THEN_CHECK, "-q", "run", "--bundle", str(d / name / "bundle"),
             "--source", f"file:{batch_dir / name / 'recording.bin'}", "--sink", f"file:{tmp_path / name}.npz",
             "--chunk-ms", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    for name, p in procs.items():
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    for name in "ac":
        with np.load(d / name / "spikes.npz") as s, np.load(tmp_path / f"{name}.npz") as r:
            a, b = np.lexsort((s["channel"], s["sample_index"])), np.lexsort((r["channel"], r["sample_index"]))
            for k in ("sample_index", "unit", "channel", "amplitude"):
                assert np.array_equal(s[k][a], r[k][b]), (name, k)


def test_missing_dask_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "s.toml").write_text('[[session]]\nrecording = "nowhere.bin"\n')
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now fails
    assert main(["batch", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'rtsort[scale]'" in err[0], err
    assert main(["sort", str(tmp_path / "x.bin"), "--bundle", str(tmp_path), "--out", str(tmp_path / "s.npz"),
                 "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rtsort[scale]" in err[0], err


@pytest.mark.parametrize("text, message", [
    ("", "no [[session]] tables"),
    ('[[session]]\nname = "x"\n', "'recording' (a path) is required"),
    ('[[session]]\nrecording = "a.bin"\ncolour = 1\n', "unknown key(s) ['colour']"),
    ('[[session]]\nrecording = "a/r.bin"\n[[session]]\nrecording = "b/r.bin"\n', "name 'r' is taken"),
    ('[[session]]\nrecording = "a.bin"\nseed = "x"\n', "'seed' must be an integer"),
    ('[[session]\n', "invalid TOML"),
])
def test_bad_sessions_file_is_a_one_line_error(tmp_path, capsys, text, message):
    (tmp_path / "s.toml").write_text(text)
    assert main(["batch", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_sessions_resolve_paths_against_the_toml(tmp_path):
    (tmp_path / "s.toml").write_text('[[session]]\nrecording = "x/rec.bin"\nbundle = "../b"\n')
    (s,) = read_sessions(tmp_path / "s.toml")
    assert s == {"recording": str(tmp_path.resolve() / "x/rec.bin"), "bundle": str(tmp_path.resolve() / "../b"),
                 "config": None, "seed": 0, "name": "rec"}
