import numpy as np

from rtsort.config import Config, SnippetConfig
from rtsort.frontend import FrontEnd
from rtsort.snippets import SnippetExtractor, extract_reference


def test_snippets_equal_slicing_for_any_chunking(small_sim):
    rec, _, _ = small_sim
    cfg = Config()
    raw = rec.get_traces(0, 6 * 30000)
    fe = FrontEnd.for_recording(cfg, rec)
    fe.calibrate(rec)
    whole = fe.process(raw)
    ev_whole, wf_whole = whole.events.copy(), whole.waveforms.copy()
    filtered = fe.preprocessor.__class__(cfg.preprocess, rec.sampling_rate, rec.n_channels,
                                         rec.gains_to_uV).process(raw).copy()
    assert ev_whole.size > 200
    np.testing.assert_array_equal(wf_whole, extract_reference(filtered, ev_whole, cfg.snippets, rec.probe,
                                                              rec.sampling_rate))
    rng = np.random.default_rng(3)
    fe.reset()
    evs, wfs, waits, s = [], [], [], 0
    while s < raw.shape[0]:
        k = int(rng.choice([1, 5, 30, 301, 40000]))
        out = fe.process(raw[s : s + k])
        evs.append(out.events)
        wfs.append(out.waveforms)
        waits.append(out.wait)
        s += k
    assert np.array_equal(np.concatenate(evs), ev_whole)
    assert np.array_equal(np.concatenate(wfs), wf_whole)
    wait = np.concatenate(waits)
    assert wait.min() >= fe.snippets.nafter - 1


def test_shape_channels_and_positions(small_sim):
    rec, _, _ = small_sim
    sc = SnippetConfig(ms_before=0.5, ms_after=1.0, n_channels=6)
    ex = SnippetExtractor(sc, rec.probe, 30000.0)
    assert (ex.n_samples, ex.k_channels) == (45, 6)
    assert np.all(ex.channel_index[:, 0] == np.arange(rec.n_channels))  # peak channel first
    d = np.linalg.norm(ex.relative_positions, axis=2)
    assert np.all(np.diff(d, axis=1) >= 0)  # ordered by distance
    assert abs(ex.wait_ms - 29 / 30.0) < 1e-9  # the 30th sample after the trough is 29 samples later


def test_one_sample_chunks_wait_exactly_ms_after():
    from rtsort.types import EVENT_DTYPE, Probe

    probe = Probe(np.column_stack([np.zeros(3), 20.0 * np.arange(3)]))
    ex = SnippetExtractor(SnippetConfig(ms_before=0.1, ms_after=0.2, n_channels=2), probe, 30000.0, 4)
    x = np.arange(300 * 3, dtype=np.float32).reshape(300, 3)
    ev = np.zeros(1, EVENT_DTYPE)
    ev["sample_index"] = 100
    out_at = None
    for t in range(300):
        e, w, wait = ex.process(x[t : t + 1], t, ev if t == 104 else np.zeros(0, EVENT_DTYPE))  # 4 samples old
        if e.size:
            out_at, wf, wt = t, w, wait
    assert out_at == 105  # trough 100 + 6 samples after - 1
    assert wt.tolist() == [5]
    np.testing.assert_array_equal(wf[0], x[97:106][:, [0, 1]])
