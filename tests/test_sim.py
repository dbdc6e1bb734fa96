import hashlib

import numpy as np
import pytest

pytest.importorskip("spikeinterface")

from rtsort.sim import simulate  # noqa: E402


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = simulate(tmp_path / "a", 8, 3, 2.0, seed=5, progress=False)
    simulate(tmp_path / "b", 8, 3, 2.0, seed=5, progress=False)
    c = simulate(tmp_path / "c", 8, 3, 2.0, seed=6, progress=False)
    assert _digest(tmp_path / "a/recording.bin") == _digest(tmp_path / "b/recording.bin")
    assert _digest(tmp_path / "a/truth.npz") == _digest(tmp_path / "b/truth.npz")
    assert _digest(tmp_path / "a/recording.bin") != _digest(tmp_path / "c/recording.bin")
    assert a.n_channels == 8 and a.n_samples == 60000 and a.dtype == np.int16
    truth = np.load(tmp_path / "a/truth.npz")
    assert truth["sample_index"].dtype == np.int64 and truth["unit"].dtype == np.int64
    assert set(np.unique(truth["unit"])) <= {0, 1, 2}
    # refractory spike trains
    for u in range(3):
        st = np.sort(truth["sample_index"][truth["unit"] == u])
        assert np.all(np.diff(st) >= 4.0 * 30)
    assert c.duration_s == 2.0


def test_drift(tmp_path):
    rec = simulate(tmp_path / "d", 16, 4, 3.0, seed=1, drift=True, progress=False)
    assert rec.n_samples == 90000
    truth = np.load(tmp_path / "d/truth.npz")
    assert truth["sample_index"].size > 0
