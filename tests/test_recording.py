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


def test_unknown_format(tmp_path):
    (tmp_path / "x.dat").write_bytes(b"\0" * 16)
    with pytest.raises(RecordingError, match="unknown recording format"):
        open_recording(tmp_path / "x.dat")
