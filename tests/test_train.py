"""Training: ONNX parity, clustering into units, accuracy against ground truth, determinism."""

import json

import numpy as np
import pytest
import torch

from rtsort.config import Config
from rtsort.evaluate import sorting_accuracy
from rtsort.features import Encoder
from rtsort.pipeline import sort_recording
from rtsort.train import train_bundle
from rtsort.train.export import export_encoder, export_linear
from rtsort.train.model import SpikeEncoder


def test_linear_path_is_the_snippets_principal_components_and_stays_fixed():
    """[train] linear_path: the latent's fixed projection is the training snippets' leading principal components
    (so the encoder starts from PCA's features), training leaves it as it was, and the Transformer's share of the
    latent is reported."""
    from rtsort.config import TrainConfig
    from rtsort.train.fit import fit_autoencoder

    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 20 * 4))
    x = (rng.normal(size=(600, 3)) * [6.0, 3.0, 1.5]) @ basis + rng.normal(size=(600, 80)) * 0.3
    x = x.reshape(600, 20, 4).astype(np.float32)
    cfg = TrainConfig(latent_dim=3, epochs=2, max_snippets=600, batch_size=128, threads=1)
    model, history = fit_autoencoder(x, np.zeros((600, 4, 2), np.float32), cfg, seed=0, progress=False)
    w = model.encoder.linear.weight.detach().numpy().astype(np.float64)  # (3, 80)
    assert not model.encoder.linear.weight.requires_grad
    np.testing.assert_allclose(w @ w.T, np.eye(3), atol=1e-5)  # orthonormal rows
    q = np.linalg.qr(basis.T)[0]  # the signal's subspace: the leading components span it
    assert np.linalg.norm(w - (w @ q) @ q.T) / np.linalg.norm(w) < 0.05
    assert 0.0 <= history["transformer_share"] <= 1.0


@pytest.mark.parametrize("linear_path", [False, True])
def test_onnx_encoder_matches_torch_for_any_batch(tmp_path, linear_path):
    torch.manual_seed(0)
    enc = SpikeEncoder(48, 8, latent_dim=12, d_model=32, n_layers=2, n_heads=4, linear_path=linear_path).eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 48, 8)).astype(np.float32) * 3
    p = rng.normal(size=(64, 8, 2)).astype(np.float32) * 30
    export_encoder(enc, tmp_path / "e.onnx", x, p)
    session = Encoder(tmp_path / "e.onnx", threads=1)
    assert session.uses_positions and session.latent_dim == 12 and session.input_shape == (48, 8)
    for b in (1, 7, 200):  # the batch axis is dynamic
        xb = rng.normal(size=(b, 48, 8)).astype(np.float32) * 3
        pb = rng.normal(size=(b, 8, 2)).astype(np.float32) * 30
        with torch.no_grad():
            ref = enc(torch.from_numpy(xb), torch.from_numpy(pb)).numpy()
        got = session(xb, pb)
        assert got.shape == (b, 12)
        assert np.abs(got - ref).max() <= 1e-4


def test_pca_encoder_matches_sklearn(tmp_path):
    from sklearn.decomposition import PCA

    x = np.random.default_rng(1).normal(size=(500, 48, 8)).astype(np.float32)
    pca = PCA(6, random_state=0).fit(x.reshape(500, -1))
    export_linear(pca.mean_.reshape(48, 8), pca.components_, tmp_path / "p.onnx")
    got = Encoder(tmp_path / "p.onnx")(x[:50])
    assert np.abs(got - pca.transform(x[:50].reshape(50, -1))).max() < 1e-4


def test_bundle_contents(trained):
    result, path = trained
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["n_channels"] == 32
    assert set(manifest["files"]) >= {"encoder.onnx", "centroids.npy", "centroid_unit.npy", "centroid_radius.npy"}
    assert len(manifest["noise_levels"]["voltage_uV"]) == 32
    assert manifest["config"]["detect"]["threshold"] == Config().detect.threshold
    assert manifest["training"]["history"]["onnx_max_abs_diff"] <= 1e-4
    units = manifest["units"]
    assert len(units) >= 6
    for u in units:
        for key in ("n_spikes", "firing_rate_hz", "snr", "isi_violations_ratio", "presence_ratio",
                    "amplitude_cutoff", "isolation_distance", "l_ratio", "silhouette", "flags"):
            assert key in u
        assert u["n_spikes"] > 0 and u["firing_rate_hz"] > 0 and u["snr"] > 0
    assert not any(f.endswith((".pkl", ".pickle")) for f in manifest["files"])


def test_sorting_accuracy_on_ground_truth(small_sim, trained):
    """The units with SNR >= 8 are sorted with accuracy >= 0.8 by the runtime pipeline."""
    rec, truth, _ = small_sim
    spikes, _ = sort_recording(rec, trained[1], progress=False)
    rep = sorting_accuracy(spikes["sample_index"], spikes["unit"], truth["sample_index"], truth["unit"],
                           rec.sampling_rate)
    snr = np.abs(truth["templates"]).max(axis=(1, 2)) / float(truth["noise_uV"])
    acc = np.array([u["accuracy"] for u in rep["units"]])
    strong = snr >= 8
    assert strong.sum() >= 5
    assert np.mean(acc[strong] >= 0.8) >= 0.8, (acc.round(2), snr.round(1))
    assert rep["summary"]["well_detected"] >= 6, rep["summary"]
    assert rep["summary"]["unassigned_fraction"] < 0.2


def test_sort_gives_the_training_labels_for_any_chunking(small_sim, trained):
    """Offline parity: the runtime pipeline labels the training recording as training did (training does not
    peel); with peeling, the same spikes and the collisions it found, for any chunking."""
    from dataclasses import replace

    from rtsort.bundle import load_bundle

    rec, _, _ = small_sim
    result, path = trained
    bundle = load_bundle(path)
    assert bundle.config.assign.peel
    a, _ = sort_recording(rec, path, chunk_s=1.0, progress=False)
    b, _ = sort_recording(rec, path, chunk_s=0.0137, progress=False)
    for name in a.dtype.names:  # field by field (a candidate's or a peeled spike's distance is NaN)
        np.testing.assert_array_equal(a[name], b[name])
    bundle.config = replace(bundle.config, assign=replace(bundle.config.assign, peel=False))
    first, _ = sort_recording(rec, bundle, chunk_s=0.0137, progress=False)
    t = result.spikes[np.lexsort((result.spikes["channel"], result.spikes["sample_index"]))]
    for name in ("sample_index", "channel", "unit"):
        np.testing.assert_array_equal(first[name], t[name])
    key = lambda s: (s["sample_index"] * 1000 + s["channel"]) * 1000 + s["unit"]  # noqa: E731
    assert np.isin(key(first), key(a)).all() and a.size > first.size  # peeling only adds


def test_templates_are_the_means_of_the_bundles_own_sort(small_sim, trained):
    """The bundle's templates reach assign.subtract_ms_after past the trough (what peeling subtracts; the
    snippet's span is the fit's template), and a round of refinement makes each unit's template the mean
    filtered signal at the spikes the bundle itself sorts, candidates and matches included, on the template's
    channels (0 elsewhere)."""
    from rtsort.bundle import load_bundle
    from rtsort.frontend import FrontEnd
    from rtsort.train.train import refined_templates

    rec, _, _ = small_sim
    b = load_bundle(trained[1])
    fe = FrontEnd.for_recording(b.config, rec, b.noise_levels)
    nb, t_len = fe.snippets.nbefore, fe.snippets.n_samples
    length = nb + int(round(b.config.assign.subtract_ms_after * rec.sampling_rate / 1000.0)) + 1
    assert b.templates.shape[1] == length > t_len
    assert np.abs(b.templates[:, t_len:]).max() > 0.1 * np.abs(b.templates).max()  # a late phase to subtract
    got = refined_templates(rec, b.contents(), 1, progress=False)
    spikes, _ = sort_recording(rec, b, progress=False)
    f = fe.preprocessor.process(rec.get_traces(0, rec.n_samples)).copy()
    counts = []
    for u in range(b.n_units):
        s = spikes["sample_index"][spikes["unit"] == u] - nb
        s = s[(s >= 0) & (s + length <= f.shape[0])]
        counts.append(s.size)
        on = np.abs(b.templates[u]).max(axis=0) > 0
        if s.size < b.config.cluster.min_cluster_size:
            np.testing.assert_array_equal(got[u], b.templates[u])
            continue
        mean = f[s[:, None] + np.arange(length)[None, :]].mean(axis=0)
        np.testing.assert_allclose(got[u][:, on], mean[:, on], atol=1e-3)
        assert not got[u][:, ~on].any()
    assert sum(c >= b.config.cluster.min_cluster_size for c in counts) >= 6, counts


@pytest.mark.parametrize("features", ["transformer", "pca"])
def test_training_is_deterministic(small_sim, tmp_path, features):
    rec, _, _ = small_sim
    cfg = Config.from_dict({"train": {"epochs": 3, "max_snippets": 3000, "features": features}})
    r1 = train_bundle(rec, tmp_path / "1", cfg, seed=5, progress=False)
    r2 = train_bundle(rec, tmp_path / "2", cfg, seed=5, progress=False)
    for name in ("centroids.npy", "centroid_unit.npy", "centroid_radius.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "1" / name), np.load(tmp_path / "2" / name))
    np.testing.assert_array_equal(r1.spikes["unit"], r2.spikes["unit"])


def test_too_few_spikes_is_a_clear_error(tmp_path):
    from rtsort.errors import RecordingError
    from rtsort.io import write_recording

    rng = np.random.default_rng(0)
    rec = write_recording(tmp_path / "quiet.bin", (rng.normal(size=(30000, 8)) * 50).astype(np.int16), 30000.0,
                          positions_um=np.c_[np.zeros(8), np.arange(8) * 20.0], gain_to_uV=0.195)
    with pytest.raises(RecordingError, match="spikes detected"):
        train_bundle(rec, tmp_path / "b", progress=False)


def test_drift_merges_joins_units_that_take_turns_and_only_those():
    """One neuron split by drift (near, alike, taking turns) is joined; alike neurons firing independently are not."""
    from rtsort.config import ClusterConfig
    from rtsort.train.cluster import drift_merges

    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 30)
    shape_a = -np.exp(-((t - 0.3) / 0.05) ** 2) + 0.3 * np.exp(-((t - 0.5) / 0.1) ** 2)
    shape_b = -np.exp(-((t - 0.3) / 0.12) ** 2)  # another neuron's waveform
    units, loc, wf, times = [], [], [], []

    def add(unit, xy, shape, spike_times):
        n = spike_times.size
        units.append(np.full(n, unit))
        loc.append(np.asarray(xy, float) + rng.normal(0, 3, (n, 2)))
        wf.append(shape * 8 + rng.normal(0, 1, (n, t.size)))
        times.append(spike_times)

    up = lambda lo, hi, n: np.sort(rng.uniform(lo, hi, n))  # noqa: E731
    # unit 0 and 1: one neuron at two depths, alternating every 15 s over 60 s
    add(0, (0, 100), shape_a, np.concatenate([up(0, 15, 80), up(30, 45, 80)]))
    add(1, (0, 112), shape_a, np.concatenate([up(15, 30, 80), up(45, 60, 80)]))
    # unit 2 and 3: alike and near, but both fire all along (two neurons)
    add(2, (0, 300), shape_a, up(0, 60, 300))
    add(3, (0, 315), shape_a, up(0, 60, 300))
    # unit 4 and 5: take turns, near, but different waveforms (two neurons)
    add(4, (0, 500), shape_a, up(0, 30, 150))
    add(5, (0, 510), shape_b, up(30, 60, 150))
    new = drift_merges(np.concatenate(units), np.concatenate(loc), np.concatenate(wf), np.concatenate(times),
                       ClusterConfig())
    assert new[0] == new[1]
    assert len({new[0], new[2], new[3], new[4], new[5]}) == 5
    off = drift_merges(np.concatenate(units), np.concatenate(loc), np.concatenate(wf), np.concatenate(times),
                       ClusterConfig(drift_merge_um=0.0))
    np.testing.assert_array_equal(off, np.arange(6))
    # a unit the final labels left without spikes (here unit 7) keeps its number and joins nothing
    more = drift_merges(np.concatenate(units), np.concatenate(loc), np.concatenate(wf), np.concatenate(times),
                        ClusterConfig(), n_units=8)
    assert more.size == 8 and len(set(more.tolist())) == 7 and more[0] == more[1]


def test_drift_merges_joins_a_piece_that_fires_only_at_one_depth():
    """A neuron that the probe's drift (a 20 um zigzag) moves off its channels leaves a small piece that fires only
    at one extreme: it joins the neuron (and not an alike neighbour, nor two alike neurons each other); without
    motion, nothing is joined."""
    from rtsort.config import ClusterConfig
    from rtsort.train.cluster import drift_merges

    rng = np.random.default_rng(1)
    t = np.linspace(0, 1, 30)
    shape = -np.exp(-((t - 0.3) / 0.05) ** 2) + 0.3 * np.exp(-((t - 0.5) / 0.1) ** 2)

    def motion(time_s):  # the probe's zigzag: +-10 um, 30 s period
        return 10.0 - 40.0 * np.abs((time_s / 30.0) % 1.0 - 0.5)

    def recording(drift: bool):
        units, loc, wf, times = [], [], [], []

        def add(unit, y, spike_times):
            n = spike_times.size
            units.append(np.full(n, unit))
            loc.append(np.c_[np.zeros(n), y + (motion(spike_times) if drift else np.zeros(n))] + rng.normal(0, 3, (n, 2)))
            wf.append(shape * 8 + rng.normal(0, 1, (n, t.size)))
            times.append(spike_times)

        s0 = np.sort(rng.uniform(0, 60, 900))
        high = motion(s0) > 6.0  # up there, some of neuron 0's spikes are clustered apart: unit 1
        piece = high & (rng.uniform(size=s0.size) < 0.4)
        add(0, 100.0, s0[~piece])
        add(1, 115.0, s0[piece])
        for unit, y in ((2, 130.0), (3, 300.0), (4, 315.0)):  # alike, near, firing whatever the depth
            add(unit, y, np.sort(rng.uniform(0, 60, 400)))
        return [np.concatenate(a) for a in (units, loc, wf, times)]

    units, loc, wf, times = recording(drift=True)
    assert (units == 1).sum() < 0.1 * (units == 0).sum()  # too few to change neuron 0's counts: no turns taken
    new = drift_merges(units, loc, wf, times, ClusterConfig(), pieces=True)
    assert new[1] == new[0] and len({new[0], new[2], new[3], new[4]}) == 4
    np.testing.assert_array_equal(drift_merges(units, loc, wf, times, ClusterConfig()), np.arange(5))  # pieces off
    units, loc, wf, times = recording(drift=False)
    np.testing.assert_array_equal(drift_merges(units, loc, wf, times, ClusterConfig(), pieces=True), np.arange(5))


def test_split_groups_separates_neighbours_of_one_shape_and_keeps_one_unit_whole():
    """Two units of one waveform shape 20 um apart, put in one group, come apart on the group's own channels;
    a single unit whose amplitude varies 0.7-1.3x stays one group."""
    from rtsort.config import ClusterConfig
    from rtsort.train.cluster import split_groups
    from rtsort.types import Probe

    rng = np.random.default_rng(5)
    n_ch, k_chan, t_len = 8, 4, 30
    probe = Probe(np.column_stack([np.zeros(n_ch), 20.0 * np.arange(n_ch)]))
    channel_index = probe.nearest(k_chan)
    t = np.linspace(0, 1, t_len)
    shape = -np.exp(-((t - 0.4) / 0.06) ** 2) + 0.3 * np.exp(-((t - 0.6) / 0.1) ** 2)
    profile = lambda centre: 8.0 * np.exp(-((np.arange(n_ch) - centre) / 1.2) ** 2)  # noqa: E731

    def spikes(centre, n, scale=(1.0, 1.0)):
        amp = profile(centre)[None, :] * rng.uniform(*scale, (n, 1))
        full = shape[None, :, None] * amp[:, None, :] + rng.normal(0, 1, (n, t_len, n_ch))
        peak = np.abs(full).max(axis=1).argmax(axis=1)  # each spike's snippet is centred on its peak channel
        return np.take_along_axis(full, channel_index[peak][:, None, :], axis=2).astype(np.float32), peak

    a, ca = spikes(3.0, 150)
    b, cb = spikes(4.0, 150)
    xn, ch = np.concatenate([a, b]), np.concatenate([ca, cb])
    out = split_groups(np.zeros(300, np.int64), xn, ch, channel_index, n_ch, ClusterConfig(), seed=0)
    assert out.max() + 1 >= 2
    major = [np.bincount(out[s]).argmax() for s in (slice(0, 150), slice(150, 300))]
    assert major[0] != major[1]
    assert np.mean(out[:150] == major[0]) > 0.9 and np.mean(out[150:] == major[1]) > 0.9
    one, c1 = spikes(3.5, 300, (0.7, 1.3))
    assert np.all(split_groups(np.zeros(300, np.int64), one, c1, channel_index, n_ch, ClusterConfig()) == 0)


def test_unimodal_merges_keeps_two_sizes_of_one_shape_apart_and_joins_one_neuron_cut_in_two():
    """A tetrode's neighbours: one waveform shape on the same four channels at 1.0x and 0.75x (template distance
    0.25, under merge_threshold) stay two units, also 50 spikes beside 1000. One neuron cut in two by its
    amplitude (a cut a clustering makes in one population) is merged; so are two groups that take turns over time
    (one neuron at two depths of a step drift), which the waveforms alone keep apart, and pieces locked to the
    depths that motion correction removed."""
    from rtsort.config import ClusterConfig
    from rtsort.train.cluster import template_distances, templates_on_probe, unimodal_merges

    rng = np.random.default_rng(3)
    n_ch, t_len = 4, 30
    channel_index = np.array([np.roll(np.arange(n_ch), -c) for c in range(n_ch)])
    t = np.linspace(0, 1, t_len)
    shape = -np.exp(-((t - 0.4) / 0.06) ** 2) + 0.3 * np.exp(-((t - 0.6) / 0.1) ** 2)
    profile = np.array([12.0, 9.0, 7.0, 5.0])
    cfg = ClusterConfig()

    def spikes(n, scale):
        full = shape[None, :, None] * (profile[None, None, :] * scale[:, None, None]) + rng.normal(0, 1, (n, t_len,
                                                                                                        n_ch))
        return full.astype(np.float32), np.zeros(n, np.int64)  # every snippet starts at channel 0

    def merges(groups, xn, ch, times=None, motion=None):
        n = int(groups.max()) + 1
        tm, counts = templates_on_probe(xn, ch, channel_index, groups, n, n_ch)
        dist = template_distances(tm, counts)
        return unimodal_merges(groups, dist, tm, counts, xn, ch, channel_index, cfg, 0, times, motion), dist

    for n_small in (1000, 50):
        a, ca = spikes(1000, rng.normal(1.0, 0.05, 1000))
        b, cb = spikes(n_small, rng.normal(0.75, 0.05, n_small))
        groups = np.r_[np.zeros(1000, np.int64), np.ones(n_small, np.int64)]
        out, dist = merges(groups, np.concatenate([a, b]), np.concatenate([ca, cb]))
        assert dist[0, 1] < cfg.merge_threshold  # alike enough that the template distance alone would merge them
        assert out[0] != out[1]
    scale = rng.normal(1.0, 0.1, 1000)
    one, c1 = spikes(1000, scale)
    cut = (scale > np.quantile(scale, 0.7)).astype(np.int64)
    out, _ = merges(cut, one, c1)
    assert out[0] == out[1]
    # a step drift: the neuron sits at one depth (its amplitude 1.0x) for 2 s, then at another (0.75x) for 2 s
    times = np.sort(rng.uniform(0, 120, 2000))
    deep = (times // 2).astype(int) % 2 == 1
    steps, cs = spikes(2000, np.where(deep, 0.75, 1.0) * rng.normal(1.0, 0.05, 2000))
    out, _ = merges(deep.astype(np.int64), steps, cs)
    assert out[0] != out[1]  # two modes in waveform; only the time says they are one neuron
    out, _ = merges(deep.astype(np.int64), steps, cs, times)
    assert out[0] == out[1]
    # three steps of 40 s (0, +20, -10 um) that motion correction left imperfect: three pieces, each pair's counts
    # correlate at -0.5 only; the displacement applied to their spikes says they are one neuron
    times = np.sort(rng.uniform(0, 120, 3000))
    step = np.minimum((times // 40).astype(np.int64), 2)
    pieces, cp = spikes(3000, np.array([1.0, 0.75, 0.55])[step] * rng.normal(1.0, 0.05, 3000))
    out, _ = merges(step, pieces, cp, times)
    assert np.unique(out).size == 3
    out, _ = merges(step, pieces, cp, times, np.array([0.0, 20.0, -10.0])[step])
    assert np.unique(out).size == 1


def test_tail_units_are_the_units_locked_to_a_bigger_neighbour():
    """A unit made of a big unit's late phase (its events 1 ms after that unit's) is a tail; an independent
    neighbour, a tail-like train 200 um away, and the big unit itself are not; tail_fraction 0 keeps all."""
    from rtsort.config import ClusterConfig
    from rtsort.train.cluster import tail_units

    rng = np.random.default_rng(4)
    fs, dur = 30000.0, 60.0
    big = np.sort(rng.choice(int(fs * dur) - 100, 600, replace=False))
    near = np.sort(rng.choice(int(fs * dur), 500, replace=False))  # an independent neighbour at 10 Hz
    echo = big[rng.random(big.size) < 0.8] + 31  # 80 % of the big spikes' repolarisation crosses the threshold
    far = big[rng.random(big.size) < 0.8] + 31  # the same lag, but 200 um away: not this unit's waveform
    units = np.concatenate([np.full(big.size, 0), np.full(near.size, 1), np.full(echo.size, 2),
                            np.full(far.size, 3), [-1]])
    samples = np.concatenate([big, near, echo, far, [5]])
    centre = np.array([[0.0, 0.0], [0.0, 20.0], [0.0, 10.0], [0.0, 200.0]])
    locations = np.concatenate([centre[u] + rng.normal(0, 3, (n, 2))
                                for u, n in enumerate([big.size, near.size, echo.size, far.size])] + [[[0.0, 0.0]]])
    size = np.array([12.0, 5.0, 4.0, 4.0])
    tail = tail_units(units, samples, locations, size, fs, ClusterConfig(), 4)
    assert tail.tolist() == [False, False, True, False]
    # of two locked units the smaller is the tail, whichever comes first
    swapped = tail_units(units, samples, locations, size[[2, 1, 0, 3]], fs, ClusterConfig(), 4)
    assert swapped.tolist() == [True, False, False, False]
    assert not tail_units(units, samples, locations, size, fs, ClusterConfig(tail_fraction=0.0), 4).any()


def test_small_units_are_those_under_a_clusters_least_size_in_the_clustering_subsample(trained):
    """A unit is too small when its spikes, scaled to the clustering's subsample, fall under min_cluster_size; the
    trained bundle keeps none such (its unit table counts its spikes and claimed candidates)."""
    from dataclasses import replace

    from rtsort.train.cluster import small_units

    cfg = Config().cluster
    labels = np.repeat([0, 1, 2, -1], [cfg.min_cluster_size - 1, cfg.min_cluster_size, 400, 50])
    assert small_units(labels, 4, cfg).tolist() == [True, False, False, True]  # unit 3: no spikes at all
    # a quarter of the spikes in the subsample: a unit needs four times the least size
    sub = replace(cfg, max_spikes=labels.size // 4)
    assert small_units(labels, 3, sub).tolist() == [True, True, False]
    result, _ = trained
    counts = np.array([u["n_spikes"] for u in result.units])
    assert counts.size and (counts >= cfg.min_cluster_size).all()
