import numpy as np
import pytest

from rtsort.config import DetectConfig
from rtsort.detect import GradientDetector, detect_reference, estimate_noise_levels
from rtsort.types import SLOPE, TROUGH, Probe

FS = 30000.0


def _line_probe(n):
    return Probe(np.column_stack([np.zeros(n), 20.0 * np.arange(n)]))


def _unit_noise(n):
    return np.ones((2, n), dtype=np.float32)


def _spike(x, t, c, depth, width=6):
    """A trough of -depth at sample t: a sharp fall over `width` samples, slower recovery."""
    x[t - width : t + 1, c] += np.linspace(0, -depth, width + 1, dtype=np.float32)
    x[t + 1 : t + 1 + 3 * width, c] += np.linspace(-depth, 0, 3 * width + 1, dtype=np.float32)[1:]


def test_single_spike_exact_index_channel_amplitude():
    x = np.zeros((300, 3), np.float32)
    _spike(x, 131, 1, 10.0)
    cfg = DetectConfig(threshold=2.0, amp_threshold=3.0)
    det = GradientDetector(cfg, _line_probe(3), FS, _unit_noise(3))
    ev = det.process(x)
    assert ev.tolist() == [(131, 1, -10.0, SLOPE)]
    assert detect_reference(x, _unit_noise(3), cfg, _line_probe(3), FS).tolist() == ev.tolist()


def test_absolute_sample_index_after_reset():
    x = np.zeros((300, 3), np.float32)
    _spike(x, 131, 1, 10.0)
    det = GradientDetector(DetectConfig(threshold=2.0, amp_threshold=3.0), _line_probe(3), FS, _unit_noise(3))
    det.reset(first_sample=10_000_000_000)
    assert det.process(x)["sample_index"].tolist() == [10_000_000_131]


def test_shallow_slope_or_trough_is_rejected():
    x = np.zeros((500, 2), np.float32)
    _spike(x, 100, 0, 2.0)  # trough too shallow for amp_threshold 3
    _spike(x, 200, 1, 10.0, width=60)  # deep but slow: no sharp slope
    cfg = DetectConfig(threshold=2.0, amp_threshold=3.0, candidate_threshold=0.0, trough_threshold=0.0, radius_um=0.0)
    assert GradientDetector(cfg, _line_probe(2), FS, _unit_noise(2)).process(x).size == 0


def test_a_trough_without_a_slope_is_a_candidate():
    """Step 5: with candidates on, a deep trough no slope event explains comes out as a TROUGH candidate."""
    x = np.zeros((500, 2), np.float32)
    _spike(x, 100, 0, 2.0)  # shallower than the candidate depth: nothing
    _spike(x, 200, 1, 10.0, width=60)  # deep but slow
    _spike(x, 400, 0, 10.0)  # a sharp spike: a slope event, and its trough is not handed over twice
    cfg = DetectConfig(threshold=2.0, amp_threshold=3.0, trough_threshold=2.5, radius_um=0.0)
    ev = GradientDetector(cfg, _line_probe(2), FS, _unit_noise(2)).process(x)
    assert ev.tolist() == [(200, 1, -10.0, TROUGH), (400, 0, -10.0, SLOPE)]
    assert detect_reference(x, _unit_noise(2), cfg, _line_probe(2), FS).tolist() == ev.tolist()


def test_spatial_dedup_keeps_the_steepest_neighbour():
    x = np.zeros((300, 4), np.float32)
    _spike(x, 120, 1, 12.0)
    _spike(x, 121, 2, 8.0)  # same spike seen weaker 20 um away
    _spike(x, 121, 3, 9.0)  # 40 um from channel 1, outside a 30 um radius of it... but within 20 um of ch 2
    cfg = DetectConfig(threshold=2.0, amp_threshold=3.0, radius_um=30.0)
    ev = GradientDetector(cfg, _line_probe(4), FS, _unit_noise(4)).process(x)
    # ch 1 wins its neighbourhood; ch 3 is steeper than its neighbour ch 2 and 40 um from ch 1: kept
    assert ev["channel"].tolist() == [1, 3]


def test_refractory_period_per_channel():
    x = np.zeros((600, 1), np.float32)
    for t in (100, 115, 200):  # 15 samples = 0.5 ms apart, then 85 samples later
        _spike(x, t, 0, 10.0, width=3)
    cfg = DetectConfig(threshold=2.0, amp_threshold=3.0, refractory_ms=1.0, sweep_ms=0.1)
    ev = GradientDetector(cfg, _line_probe(1), FS, _unit_noise(1)).process(x)
    assert ev[ev["kind"] == SLOPE]["sample_index"].tolist() == [100, 200]
    # the spike the refractory period hid still has its trough: a candidate that only a template makes a spike
    assert ev[ev["kind"] == TROUGH]["sample_index"].tolist() == [115]


def test_polarity_options():
    x = np.zeros((400, 1), np.float32)
    _spike(x, 100, 0, 10.0)
    _spike(x, 250, 0, -10.0)  # an upward spike: peak at 250
    def run(pol):
        cfg = DetectConfig(threshold=2.0, amp_threshold=3.0, polarity=pol, refractory_ms=0.5)
        return GradientDetector(cfg, _line_probe(1), FS, _unit_noise(1)).process(x)["sample_index"].tolist()
    assert run("neg") == [100]
    assert run("pos") == [250]
    assert run("both") == [100, 250]


def test_noise_levels_mad():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200000, 3)) * np.array([1.0, 2.0, 4.0])).astype(np.float32)
    noise = estimate_noise_levels(x, slope=1)
    np.testing.assert_allclose(noise[1], [1, 2, 4], rtol=0.02)
    np.testing.assert_allclose(noise[0], np.sqrt(2) * np.array([1, 2, 4]), rtol=0.02)


def test_needs_noise_levels():
    det = GradientDetector(DetectConfig(), _line_probe(2), FS)
    with pytest.raises(ValueError, match="no noise levels"):
        det.process(np.zeros((10, 2), np.float32))


@pytest.mark.parametrize("polarity", ["neg", "pos", "both"])
def test_numba_equals_numpy_reference(small_sim, small_filtered, polarity):
    rec, _, _ = small_sim
    cfg = DetectConfig(polarity=polarity)
    x = small_filtered[:150000]
    det = GradientDetector(cfg, rec.probe, rec.sampling_rate)
    noise = det.calibrate(x)
    fast = det.process(x)
    ref = detect_reference(x, noise, cfg, rec.probe, rec.sampling_rate)
    assert fast.size > 100
    assert np.array_equal(fast, ref)


def test_identical_events_for_any_chunking(small_sim, small_filtered):
    rec, _, _ = small_sim
    det = GradientDetector(DetectConfig(), rec.probe, rec.sampling_rate)
    det.calibrate(small_filtered)
    whole = det.process(small_filtered).copy()
    assert whole.size > 500
    rng = np.random.default_rng(11)
    sizes = (1, 2, 3, 17, 30, 299, 3001, 30000, 90000)  # 1 sample .. 3 s
    for trial in range(3):
        det.reset()
        parts, s = [], 0
        while s < small_filtered.shape[0]:
            k = int(rng.choice(sizes))
            parts.append(det.process(small_filtered[s : s + k]).copy())
            s += k
        assert np.array_equal(np.concatenate(parts), whole)


def test_spike_time_modulo_chunk_is_flat(small_sim, small_filtered):
    """The Kilosort 2-3 edge bug: spikes lost near chunk edges show as a dip in this histogram."""
    rec, truth, _ = small_sim
    det = GradientDetector(DetectConfig(), rec.probe, rec.sampling_rate)
    det.calibrate(small_filtered)
    chunk = 300
    events = np.concatenate([det.process(small_filtered[s : s + chunk]).copy()
                             for s in range(0, small_filtered.shape[0], chunk)])
    hist = np.bincount((events["sample_index"] % chunk) * 10 // chunk, minlength=10)
    expected = events.size / 10
    # Poisson spread is ~sqrt(expected); a lost edge would empty the first or last bin
    assert np.all(np.abs(hist - expected) < 5 * np.sqrt(expected)), hist
    # and recall of true spikes within 0.3 ms of a chunk edge matches recall elsewhere
    t = truth["sample_index"]
    t = t[(t > 60) & (t < small_filtered.shape[0] - 60)]
    found = np.array([np.any(np.abs(events["sample_index"] - s) <= 12) for s in t])
    edge = np.minimum(t % chunk, chunk - t % chunk) <= 9
    assert abs(found[edge].mean() - found[~edge].mean()) < 0.08
