"""The development corpus (tools/corpus.py): a fixed, balanced tune / report split, and one tiny generation."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "tools" / "corpus.py"
_spec = importlib.util.spec_from_file_location("rtsort_tools_corpus", _PATH)
corpus = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = corpus  # dataclasses look their module up
_spec.loader.exec_module(corpus)

# The split as published: a recording never moves between halves (tuning on a report recording
# would make the published numbers worthless). Change these only together with a new report.
EXPECTED_TUNE = {"t01-tetrode-static", "t02-32ch-zigzag", "t03-32ch-static-crowded", "t04-64ch-steps",
                 "t05-128ch-nonrigid", "t06-384ch-ramp", "t07-tetrode-steps-long", "t08-32ch-nonrigid-long"}
EXPECTED_REPORT = {"r01-tetrode-ramp", "r02-32ch-steps", "r03-32ch-static-sparse", "r04-64ch-nonrigid",
                   "r05-128ch-static", "r06-384ch-zigzag", "r07-tetrode-zigzag-long", "r08-32ch-ramp-long"}


def test_split_is_fixed_disjoint_and_complete():
    ids = [s.id for s in corpus.RECORDINGS]
    assert len(ids) >= 16 and len(set(ids)) == len(ids)
    tune, report = set(corpus.TUNE), set(corpus.REPORT)
    assert len(tune) == len(corpus.TUNE) and len(report) == len(corpus.REPORT)
    assert not tune & report, f"in both halves: {sorted(tune & report)}"
    for rec_id in ids:  # every recording in exactly one half
        assert (rec_id in tune) + (rec_id in report) == 1, rec_id
    assert tune | report == set(ids)
    assert abs(len(tune) - len(report)) <= 1
    assert tune == EXPECTED_TUNE and report == EXPECTED_REPORT
    for s in corpus.RECORDINGS:
        assert s.split == ("tune" if s.id in tune else "report")


def test_split_is_balanced():
    for attr, values in (("kind", corpus.KINDS), ("probe", tuple(corpus.PROBES))):
        for value in values:
            halves = {s.split for s in corpus.RECORDINGS if getattr(s, attr) == value}
            assert halves == {"tune", "report"}, f"{attr} {value} only in {halves}"


def test_specs_cover_the_brief():
    specs = corpus.RECORDINGS
    assert {s.n_channels for s in specs} >= {4, 32, 64, 128, 384}
    assert {s.layout for s in specs} >= {"crowded", "sparse"}
    assert min(s.noise_uV for s in specs) >= 5 and max(s.noise_uV for s in specs) <= 12
    assert min(s.n_units for s in specs) >= 8 and max(s.n_units for s in specs) <= 120
    assert min(s.snr[0] for s in specs) == 2.5 and max(s.snr[1] for s in specs) == 50
    assert all(180 <= s.duration_s <= 600 for s in specs)
    assert all(s.duration_s == 180 for s in specs if s.n_channels == 384)
    # seeds: distinct, and clear of rtsort's default seeds (0-3 in sim.py, compare.py and the CLI)
    seeds = [s.seed for s in specs]
    assert len(set(seeds)) == len(seeds) and min(seeds) >= 1000
    assert sum(corpus.disk_bytes(s) for s in specs) < 16e9


def test_digest_tracks_the_spec_and_scale():
    s = corpus.RECORDINGS[0]
    assert s.digest() == s.digest()
    assert s.digest() != s.digest(0.5)
    assert s.digest() != corpus.RECORDINGS[1].digest()


def test_displacement_shapes():
    t = (np.arange(900) + 0.5) / 5.0
    for s in corpus.RECORDINGS:
        d = corpus.displacement_trace(s, t, 180.0)
        assert d.shape == t.shape
        if s.kind == "static":
            assert not d.any()
        else:
            assert np.abs(d).max() > 5
    steps = corpus.SPECS["t04-64ch-steps"]
    d = corpus.displacement_trace(steps, t, 180.0)
    assert d[0] == 0 and d[450] == 15 and d[-1] == -10


def test_quick_generation(tmp_path):
    """One recording through the real code path, durations scaled down; shapes and the done-marker."""
    pytest.importorskip("spikeinterface")
    rec_id = "t08-32ch-nonrigid-long"
    spec = corpus.SPECS[rec_id]
    scale = 0.02
    (folder,) = corpus.ensure([rec_id], root=tmp_path, duration_scale=scale)
    assert folder == corpus.recording_dir(rec_id, tmp_path)
    meta = json.loads((folder / "recording.json").read_text())
    n_samples = int(round(spec.duration_s * scale * corpus.SAMPLING_RATE))
    assert meta["n_channels"] == 32 and meta["dtype"] == "int16" and meta["sampling_rate"] == 30000.0
    assert len(meta["channel_positions_um"]) == 32
    assert (folder / "recording.bin").stat().st_size == n_samples * 32 * 2
    truth = np.load(folder / "truth.npz")
    assert truth["sample_index"].dtype == np.int64 and truth["unit"].dtype == np.int64
    assert truth["sample_index"].size > 0 and truth["unit"].max() < spec.n_units
    assert truth["templates"].shape[0] == spec.n_units and truth["templates"].shape[2] == 32
    assert truth["unit_snr"].shape == (spec.n_units,)
    np.testing.assert_allclose([truth["unit_snr"].min(), truth["unit_snr"].max()], spec.snr, rtol=1e-3)
    motion = np.load(folder / "motion.npz")
    n_bins = int(np.ceil(spec.duration_s * scale * corpus.MOTION_FS))
    assert motion["times_s"].shape == (n_bins,)
    assert motion["displacement_um"].shape == (n_bins, motion["depths_um"].size)
    assert motion["unit_displacement_um"].shape == (n_bins, spec.n_units)
    assert motion["depths_um"].size >= 2 and np.all(np.diff(motion["depths_um"]) <= corpus.DEPTH_BIN_UM)
    disp = motion["displacement_um"]
    assert np.abs(disp).max() > 1  # it moves, and less at the top (factor 0.3) than at the bottom
    np.testing.assert_allclose(disp[:, -1], 0.3 * disp[:, 0], atol=1e-9)
    marker = json.loads((folder / "corpus.json").read_text())
    assert marker["hash"] == spec.digest(scale) and corpus.is_complete(rec_id, tmp_path, scale)
    # cached: a second call regenerates nothing
    stamp = (folder / "recording.bin").stat().st_mtime_ns
    corpus.ensure([rec_id], root=tmp_path, duration_scale=scale)
    assert (folder / "recording.bin").stat().st_mtime_ns == stamp
