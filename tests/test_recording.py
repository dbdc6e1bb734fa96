import json

import numpy as np
import pytest

from rtsort.errors import RecordingError
from rtsort.io import BinaryRecording, open_recording, write_recording


def _write(tmp_path, n=1000, c=4, dtype="int16", **kw):
    rng = np.random.default_rng(0)
    x = rng.integers(-1000, 1000, size=(n, c)).astype(dtype)
    pos = np.column_stack([np.zeros(c), 20.0 * np.arange(c)])
    rec = write_recording(tmp_path / "r.bin", x, 30000.0, pos, gain_to_uV=0.195, **kw)
    return rec, x


def test_roundtrip_and_chunks(tmp_path):
    rec, x = _write(tmp_path)
    assert isinstance(rec, BinaryRecording)
    assert (rec.n_samples, rec.n_channels, rec.sampling_rate) == (1000, 4, 30000.0)
    np.testing.assert_array_equal(rec.get_traces(0, 1000), x)
    chunks = list(rec.iter_chunks(300))
    assert [c.first_sample for c in chunks] == [0, 300, 600, 900]
    np.testing.assert_array_equal(np.vstack([c.samples for c in chunks]), x)
    assert rec.probe.positions_um.shape == (4, 2)
    assert np.allclose(rec.gains_to_uV, 0.195)
    # the data is memory-mapped, not loaded
    assert isinstance(rec._data, np.memmap)


def test_write_in_blocks(tmp_path):
    blocks = [np.full((10, 3), i, dtype=np.float32) for i in range(5)]
    rec = write_recording(tmp_path / "b.bin", iter(blocks), 1000.0)
    assert rec.n_samples == 50 and rec.dtype == np.float32
    assert rec.get_traces(45, 50)[0, 0] == 4


def _edit_sidecar(tmp_path, **changes):
    side = tmp_path / "r.json"
    meta = json.loads(side.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    side.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(sampling_rate=0), "sampling_rate must be a positive number"),
        (dict(sampling_rate=-5.0), "sampling_rate must be a positive number"),
        (dict(dtype="int12"), "unknown dtype 'int12'"),
        (dict(channel_positions_um=[[0, 0], [0, 20]]), "2 channel positions for 4 channels"),
        (dict(n_channels=None), "missing required key 'n_channels'"),
        (dict(n_channels=3, channel_ids=["0", "1", "2"], channel_positions_um=[[0, 0], [0, 20], [0, 40]]),
         "not a multiple of n_channels * itemsize"),
        (dict(channel_ids=["a"]), "channel_ids for 4 channels"),
    ],
)
def test_sidecar_errors_name_file_and_problem(tmp_path, changes, message):
    _write(tmp_path)
    _edit_sidecar(tmp_path, **changes)
    with pytest.raises(RecordingError) as info:
        open_recording(tmp_path / "r.bin")
    assert message in str(info.value)
    assert "r.json" in str(info.value) or "r.bin" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_invalid_sidecar(tmp_path):
    _write(tmp_path)
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(RecordingError, match="invalid JSON"):
        BinaryRecording(tmp_path / "r.bin")
    (tmp_path / "r.json").unlink()
    with pytest.raises(RecordingError, match="sidecar not found"):
        open_recording(tmp_path / "r.bin")
    with pytest.raises(RecordingError, match="recording not found"):
        open_recording(tmp_path / "nope.bin")


def test_truncated_file(tmp_path):
    _write(tmp_path)
    data = (tmp_path / "r.bin").read_bytes()
    (tmp_path / "r.bin").write_bytes(data[:-3])
    with pytest.raises(RecordingError, match="truncated file"):
        open_recording(tmp_path / "r.bin")


def test_spikeinterface_folder(tmp_path):
    si = pytest.importorskip("spikeinterface.core")
    rec, _ = si.generate_ground_truth_recording(durations=[0.5], num_channels=4, num_units=2, seed=0)
    rec.save(folder=tmp_path / "si_rec")
    r = open_recording(tmp_path / "si_rec")
    assert r.n_channels == 4 and r.sampling_rate == rec.get_sampling_frequency()
    np.testing.assert_allclose(r.get_traces(0, 100), rec.get_traces(start_frame=0, end_frame=100))
    np.testing.assert_allclose(r.probe.positions_um, rec.get_channel_locations())


def _write_spikeglx(folder, data, fs=30000.0):
    """A Neuropixels 1.0 SpikeGLX run as SpikeGLX writes it: int16 AP channels then the sync channel, and the
    .meta that says which of the probe's 384 sites they are (bank 0, gain 500)."""
    folder.mkdir(parents=True)
    n_samples, n_ap = data.shape
    raw = np.concatenate([data, np.zeros((n_samples, 1), np.int16)], axis=1)
    path = folder / "run_g0_t0.imec0.ap.bin"
    raw.tofile(path)
    sites = "".join(f"({i} 0 0 500 250 1)" for i in range(384))
    chans = "".join(f"(AP{i};{i}:{i})" for i in range(n_ap)) + "(SY0;384:384)"
    meta = [f"fileName={path}", "typeThis=imec", f"imSampRate={fs:g}", f"nSavedChans={n_ap + 1}",
            f"fileSizeBytes={path.stat().st_size}", f"fileTimeSecs={n_samples / fs}", "firstSample=0",
            "acqApLfSy=384,384,1", f"snsApLfSy={n_ap},0,1", "imAiRangeMax=0.6", "imAiRangeMin=-0.6",
            "imMaxInt=512", "imDatPrb_type=0", "imDatPrb_pn=NP1000", f"snsSaveChanSubset=0:{n_ap - 1},384",
            f"~imroTbl=(0,384){sites}", f"~snsChanMap=(384,384,1){chans}"]
    path.with_suffix(".meta").write_text("\n".join(meta) + "\n")
    return path


def test_spikeglx_run_folder_and_its_ap_file(tmp_path):
    """A Neuropixels recording as SpikeGLX saves it opens from its folder or from its .imec0.ap.bin: the AP
    channels' samples (not the sync channel), the gain to uV from the .meta, the probe's site positions."""
    pytest.importorskip("spikeinterface.extractors")
    data = np.random.default_rng(0).integers(-300, 300, size=(6000, 8)).astype(np.int16)
    path = _write_spikeglx(tmp_path / "run_g0", data)
    for where in (path.parent, path):
        r = open_recording(where)
        assert (r.n_channels, r.sampling_rate, r.n_samples) == (8, 30000.0, 6000)
        np.testing.assert_array_equal(r.get_traces(0, r.n_samples), data)
        np.testing.assert_array_equal(np.concatenate([c.samples for c in r.iter_chunks(1000)]), data)
        np.testing.assert_allclose(r.gains_to_uV, 0.6 / 512 / 500 * 1e6)  # 2.34 uV per bit
        # Neuropixels 1.0's staggered sites: two per row, 20 um apart
        np.testing.assert_allclose(r.probe.positions_um[:4], [[16, 0], [48, 0], [0, 20], [32, 20]])
    meta = path.with_suffix(".meta")
    meta.write_text("\n".join(line for line in meta.read_text().splitlines() if "imroTbl" not in line))
    with pytest.raises(RecordingError, match="could not read it"):
        open_recording(path)


def test_open_ephys_binary_folder(tmp_path, caplog):
    """An Open Ephys (binary format) recording opens from its folder: its int16 samples, the bit_volts gain of
    structure.oebin; without a probe in the file, a linear layout and a warning that says so."""
    pytest.importorskip("spikeinterface.extractors")
    n_samples, n_ch = 6000, 8
    rec = tmp_path / "oe" / "Record Node 101" / "experiment1" / "recording1"
    cont = rec / "continuous" / "Acquisition_Board-100.Rhythm Data"
    cont.mkdir(parents=True)
    data = np.random.default_rng(1).integers(-300, 300, size=(n_samples, n_ch)).astype(np.int16)
    data.tofile(cont / "continuous.dat")
    np.save(cont / "sample_numbers.npy", np.arange(1000, 1000 + n_samples, dtype=np.int64))
    np.save(cont / "timestamps.npy", np.arange(1000, 1000 + n_samples) / 30000.0)
    channels = [{"channel_name": f"CH{i + 1}", "description": "", "identifier": "", "history": "",
                 "bit_volts": 0.195, "units": "uV", "source_processor_index": i, "recorded_processor_index": i}
                for i in range(n_ch)]
    stream = {"folder_name": "Acquisition_Board-100.Rhythm Data/", "sample_rate": 30000.0,
              "source_processor_name": "Acquisition Board", "source_processor_id": 100,
              "stream_name": "Rhythm Data", "recorded_processor": "Acquisition Board", "recorded_processor_id": 100,
              "num_channels": n_ch, "channels": channels}
    (rec / "structure.oebin").write_text(json.dumps({"GUI version": "0.6.4", "continuous": [stream], "events": [],
                                                     "spikes": []}))
    with caplog.at_level("WARNING", logger="rtsort.io"):
        r = open_recording(tmp_path / "oe")
    assert (r.n_channels, r.sampling_rate, r.n_samples) == (n_ch, 30000.0, n_samples)
    np.testing.assert_array_equal(r.get_traces(0, n_samples), data)
    np.testing.assert_allclose(r.gains_to_uV, 0.195)
    np.testing.assert_allclose(r.probe.positions_um[:, 1], 20.0 * np.arange(n_ch))
    assert "no channel positions" in caplog.text


def test_unknown_format(tmp_path):
    (tmp_path / "x.dat").write_bytes(b"\0" * 16)
    with pytest.raises(RecordingError, match="unknown recording format"):
        open_recording(tmp_path / "x.dat")
