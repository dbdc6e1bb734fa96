import numpy as np
import pytest
from scipy import signal

from rtsort.config import PreprocessConfig
from rtsort.dsp import Preprocessor, _median_bracketed, design_bandpass, preprocess_array


def _random_chunks(n, rng, sizes=(1, 2, 7, 30, 301, 3000, 45000)):
    s = 0
    while s < n:
        k = int(rng.choice(sizes))
        yield s, min(s + k, n)
        s += k


@pytest.mark.parametrize("reference", ["none", "median", "average"])
def test_streaming_equals_whole_for_any_chunking(reference):
    rng = np.random.default_rng(1)
    raw = (rng.normal(size=(60000, 16)) * 80 + 300).astype(np.int16)  # DC offset included
    cfg = PreprocessConfig(reference=reference)
    whole = preprocess_array(raw, cfg, 30000.0, 0.195)
    for trial in range(3):
        pre = Preprocessor(cfg, 30000.0, 16, 0.195)
        parts = [pre.process(raw[a:b]).copy() for a, b in _random_chunks(raw.shape[0], rng)]
        streamed = np.vstack(parts)
        np.testing.assert_allclose(streamed, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
        assert np.array_equal(streamed, whole)  # same arithmetic per sample: exactly equal


def test_filter_matches_scipy_sosfilt():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30000, 8)) * 50
    cfg = PreprocessConfig(reference="none")
    sos = design_bandpass(cfg, 30000.0)
    zi = signal.sosfilt_zi(sos)[:, :, None] * x[0][None, None, :]
    ref, _ = signal.sosfilt(sos, x, axis=0, zi=zi)
    out = preprocess_array(x.astype(np.float32), cfg, 30000.0)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_dc_offset_does_not_ring():
    raw = np.full((3000, 4), 2000, dtype=np.int16)
    out = preprocess_array(raw, PreprocessConfig(reference="none"), 30000.0, 0.195)
    assert np.abs(out).max() < 1e-3


def test_median_reference_is_exact():
    rng = np.random.default_rng(3)
    buf = np.zeros(384, np.float32)
    for n in (1, 2, 3, 4, 31, 384):
        rows = rng.normal(size=(300, n)).astype(np.float32)
        rows[::4, : n // 2] = 0.25  # ties
        rows[1::9] *= 1000  # jumps that miss the bracket
        state = np.array([0.0, 1.0], np.float32)
        for r in rows:
            assert _median_bracketed(r, buf[:n], state) == np.float32(np.median(r))


def test_common_median_reference_removes_common_signal():
    rng = np.random.default_rng(4)
    common = rng.normal(size=(20000, 1)) * 200
    x = (rng.normal(size=(20000, 32)) * 5 + common).astype(np.float32)
    cfg = PreprocessConfig(reference="median")
    out = preprocess_array(x, cfg, 30000.0)
    none = preprocess_array(x, PreprocessConfig(reference="none"), 30000.0)
    assert out[1000:].std() < 0.2 * none[1000:].std()


def test_nan_samples_are_counted_and_do_not_poison_the_state():
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(3000, 4)) * 20).astype(np.float32)
    x[100, 2] = np.nan
    x[200, :] = np.inf
    pre = Preprocessor(PreprocessConfig(), 30000.0, 4)
    out = pre.process(x)
    assert np.all(np.isfinite(out))
    assert pre.n_nonfinite == 5


def test_wrong_channel_count_is_refused():
    pre = Preprocessor(PreprocessConfig(), 30000.0, 4)
    with pytest.raises(ValueError, match=r"expected \(n_samples, 4\)"):
        pre.process(np.zeros((10, 5), np.int16))


def test_auto_reference_is_the_median_unless_a_spike_covers_half_the_probe():
    from rtsort.dsp import resolve_reference

    tetrode = np.array([[0.0, 0.0], [25.0, 0.0], [0.0, 25.0], [25.0, 25.0]])
    column = np.column_stack([np.zeros(32), 25.0 * np.arange(32)])
    assert resolve_reference("auto", tetrode) == "none"  # every channel carries every spike
    assert resolve_reference("auto", column) == "median"
    assert resolve_reference("median", tetrode) == "median"  # an explicit choice stands
    assert resolve_reference("auto", None) == "median"
