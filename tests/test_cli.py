import json
import subprocess
import sys

import numpy as np
import pytest

from rtsort.cli import main

COMMANDS = ["simulate", "detect", "train", "sort", "eval", "report", "phy", "curate", "run", "replay", "bench", "demo", "export",
            "batch", "recover"]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "rtsort", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cmd", [None] + COMMANDS)
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as info:
        main(([cmd] if cmd else []) + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rtsort" in out
    if cmd:
        assert "(default:" in out  # defaults shown


def test_bad_input_gives_one_line_error_and_no_traceback(tmp_path):
    (tmp_path / "r.bin").write_bytes(b"\0" * 10)
    (tmp_path / "r.json").write_text(json.dumps({"sampling_rate": -1, "n_channels": 2, "dtype": "int16"}))
    res = _run("detect", str(tmp_path / "r.bin"), "--out", str(tmp_path / "e.npz"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "sampling_rate must be a positive number" in lines[0], res.stderr


def test_bad_argument_is_refused():
    res = _run("simulate", "/tmp/x", "--channels", "0")
    assert res.returncode == 2 and "must be >= 1" in res.stderr and "Traceback" not in res.stderr


def test_simulate_then_detect_with_truth(tmp_path):
    res = _run("-q", "simulate", str(tmp_path / "s"), "--channels", "8", "--units", "3", "--duration", "3")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "s/recording.bin").exists() and (tmp_path / "s/truth.npz").exists()
    res = _run("-q", "detect", str(tmp_path / "s/recording.bin"), "--out", str(tmp_path / "e.npz"),
               "--truth", str(tmp_path / "s/truth.npz"), "--json", str(tmp_path / "q.json"))
    assert res.returncode == 0, res.stderr
    ev = np.load(tmp_path / "e.npz")
    assert ev["sample_index"].dtype == np.int64 and ev["sample_index"].size > 10
    q = json.loads((tmp_path / "q.json").read_text())
    assert 0 < q["recall"] <= 1 and 0 < q["precision"] <= 1
    assert "recall" in res.stdout


def test_sort_then_eval(small_sim, trained, tmp_path, capsys):
    rec, _, sim_dir = small_sim
    assert main(["-q", "sort", str(rec.source), "--bundle", str(trained[1]), "--out", str(tmp_path / "s.npz")]) == 0
    s = np.load(tmp_path / "s.npz")
    assert s["sample_index"].dtype == np.int64 and s["unit"].dtype == np.int32
    assert s["channel"].dtype == np.int32 and s["amplitude"].dtype == np.float32
    assert float(s["sampling_rate"]) == 30000.0
    assert main(["-q", "eval", str(tmp_path / "s.npz"), "--truth", str(sim_dir / "truth.npz"),
                 "--json", str(tmp_path / "a.json")]) == 0
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["summary"]["n_true_units"] == 12 and 0 < rep["summary"]["mean_accuracy"] <= 1
    assert len(rep["units"]) == 12
    assert "well detected" in capsys.readouterr().out


def test_train_command_errors_are_one_line(tmp_path):
    res = _run("train", str(tmp_path / "missing.bin"), "--out", str(tmp_path / "b"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = _run("sort", str(tmp_path / "missing.bin"), "--bundle", str(tmp_path / "nob"), "--out",
               str(tmp_path / "s.npz"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_train_command_writes_a_bundle(small_sim, tmp_path):
    rec, _, _ = small_sim
    (tmp_path / "c.toml").write_text('[train]\nfeatures = "pca"\n')
    res = _run("-q", "train", str(rec.source), "--out", str(tmp_path / "b"), "--config", str(tmp_path / "c.toml"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "b/manifest.json").exists() and "units from" in res.stdout and "flags" in res.stdout


def test_bench_tiny_grid_writes_positive_figures(tmp_path, monkeypatch):
    """rtsort bench on a tiny grid: the JSON has every figure, each a positive number, and the plot is written."""
    monkeypatch.setenv("RTSORT_CACHE", str(tmp_path / "cache"))
    assert main(["-q", "bench", "--channels", "8", "--chunk-ms", "1", "5", "--transport", "inproc", "zmq",
                 "--seconds", "2", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]) == 0
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["machine"]["cores"] >= 1 and rep["machine"]["onnxruntime"]
    rows = rep["results"]
    assert [(r["chunk_ms"], r["transport"]) for r in rows] == [(1.0, "inproc"), (1.0, "zmq"), (5.0, "inproc"),
                                                                (5.0, "zmq")]
    for r in rows:
        assert all(v > 0 for v in r["compute_ms"].values())
        if r["transport"] == "inproc":
            assert r["x_real_time"] > 0 and r["spikes_per_s"] > 0
            assert set(r["stage_ms"]) == {"preprocess", "detect", "snippets", "encode", "assign", "peel"}
        else:
            assert r["events_received"] > 0 and all(v > 0 for v in r["trough_to_event_ms"].values())
            assert set(r["stage_ms"]) == {"preprocess", "detect", "snippets", "encode", "assign", "peel", "sink"}
            assert r["stage_ms"]["sink"]["max"] > 0 and r["wait_ms"]["p50"] > 0 and r["arrival_ms"]["p50"] > 0
            assert r["gaps"] == 0
    assert (tmp_path / "b.png").stat().st_size > 10000
    (cmp,) = rep["comparisons"]  # same-run comparisons: detection vs SpikeInterface, onnxruntime vs torch
    assert cmp["detection"]["rtsort"]["x_real_time"] > 0 and cmp["detection"]["speedup"] > 0
    assert cmp["detection"]["spikeinterface_locally_exclusive"]["n_events"] > 0
    assert cmp["encoder"]["onnxruntime_us_per_spike"] > 0 and cmp["encoder"]["torch_us_per_spike"] > 0


def test_bench_headroom_search(tmp_path, monkeypatch):
    monkeypatch.setenv("RTSORT_CACHE", str(tmp_path / "cache"))
    assert main(["-q", "bench", "--channels", "4", "--chunk-ms", "5", "--seconds", "1", "--no-compare",
                 "--headroom", "8", "--json", str(tmp_path / "b.json")]) == 0
    (h,) = json.loads((tmp_path / "b.json").read_text())["headroom"]
    assert [t["channels"] for t in h["tried"]][0] == 4 and h["chunk_ms"] == 5.0
    assert all(t["x_real_time"] > 0 and t["compute_p99_ms"] > 0 for t in h["tried"])
    assert h["largest_real_time_channels"] in (None, 4, 8)


def test_bench_with_your_own_bundle_uses_its_probe_and_rate(tmp_path, monkeypatch):
    """--bundle: the benchmark recording is simulated on the bundle's own layout and rate, so the bundle accepts it."""
    from rtsort.config import Config
    from rtsort.sim import simulate
    from rtsort.train import train_bundle

    monkeypatch.setenv("RTSORT_CACHE", str(tmp_path / "cache"))
    grid = np.array([(x, y) for y in range(0, 80, 25) for x in range(0, 80, 25)], float)  # 4 x 4, 25 um pitch
    rec = simulate(tmp_path / "sim", 16, 6, 12.0, seed=4, sampling_rate=20000.0, progress=False, positions_um=grid)
    np.testing.assert_allclose(rec.probe.positions_um, grid)
    train_bundle(rec, tmp_path / "b", Config.from_dict({"train": {"epochs": 2, "max_snippets": 1000}}),
                 progress=False)
    assert main(["-q", "bench", "--bundle", str(tmp_path / "b"), "--seconds", "2", "--no-compare",
                 "--json", str(tmp_path / "b.json")]) == 0
    (row,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert row["channels"] == 16 and row["sampling_rate"] == 20000.0 and row["compute_ms"]["p50"] > 0


def test_report_for_a_bundle_and_its_spikes(small_sim, trained, tmp_path):
    """rtsort report draws every plot and lists every unit; a path that is neither input is a one-line error."""
    from rtsort.io.spikes import save_spikes
    from rtsort.pipeline import sort_recording
    from rtsort.report import spike_summary

    rec, _, _ = small_sim
    spikes, _ = sort_recording(rec, trained[1], progress=False)
    sp = save_spikes(tmp_path / "s.npz", spikes, rec.sampling_rate)
    r = _run("-q", "report", str(sp), "--bundle", str(trained[1]), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    for name in ("waveforms", "probe", "feature_space", "isi", "activity"):
        png = (tmp_path / "rep" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    page = (tmp_path / "rep" / "index.html").read_text()
    rows = spike_summary(spikes, rec.sampling_rate)
    assert len(rows) == len(np.unique(spikes["unit"][spikes["unit"] >= 0])) > 0
    assert sum(r["n_spikes"] for r in rows) == int(np.sum(spikes["unit"] >= 0))
    for row in trained[0].units:
        assert f"<td>{row['unit']}</td>" in page
    bad = _run("report", str(rec.source), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "neither a bundle" in bad.stderr and "Traceback" not in bad.stderr


def test_demo_end_to_end(tmp_path):
    """The README's main command, small: every output is written and the scoring found units."""
    out = tmp_path / "demo"
    r = _run("-q", "demo", "--out", str(out), "--duration", "20", "--channels", "16", "--units", "6", "--seed", "2")
    assert r.returncode == 0, r.stderr
    for name in ("recording.bin", "truth.npz", "bundle/manifest.json", "spikes.npz", "accuracy.json",
                 "report/index.html", "report/waveforms.png"):
        assert (out / name).is_file(), name
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["summary"]["n_true_units"] == 6 and acc["summary"]["well_detected"] >= 3, acc["summary"]
    assert "well detected" in r.stdout and "plots:" in r.stdout
