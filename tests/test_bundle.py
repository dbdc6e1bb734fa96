"""Bundle validation, the runtime's feature path, assignment, and no torch at run time."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from rtsort.assign import AMPLITUDE_RANGE, Assigner, LatePhase, TemplateMatcher
from rtsort.bundle import load_bundle
from rtsort.errors import BundleError
from rtsort.io import write_recording
from rtsort.pipeline import Pipeline, sort_recording
from rtsort.types import EVENT_DTYPE, MATCH, SLOPE, TAIL


@pytest.fixture
def bundle_copy(trained, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(trained[1], dst)
    return dst


def test_load_round_trip(trained):
    b = load_bundle(trained[1])
    assert b.n_channels == 32 and b.sampling_rate == 30000.0
    assert b.noise_levels.shape == (2, 32) and np.all(b.noise_levels > 0)
    assert b.centroids.shape[1] == b.features["latent_dim"] + 2
    assert b.templates.shape[0] == b.n_units and b.templates.shape[2] == 32


def test_tampered_file_is_refused(bundle_copy):
    c = np.load(bundle_copy / "centroids.npy")
    np.save(bundle_copy / "centroids.npy", c + 1e-3)
    with pytest.raises(BundleError, match="centroids.npy: sha256 .* does not match"):
        load_bundle(bundle_copy)


def test_truncated_encoder_is_refused(bundle_copy):
    data = (bundle_copy / "encoder.onnx").read_bytes()
    (bundle_copy / "encoder.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="encoder.onnx: sha256"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(schema_version=99), "schema version 99"),
    (lambda m: m.update(schema="other"), "not an rtsort bundle"),
    (lambda m: m["files"].pop("centroids.npy"), "centroids.npy is not listed"),
    (lambda m: m.update(channel_positions_um=m["channel_positions_um"][:-1]), "channel_positions_um has shape"),
    (lambda m: m["config"]["detect"].update(threshold=-1), "detect.threshold must be"),
])
def test_bad_manifest_is_refused(bundle_copy, edit, message):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    edit(m)
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_missing_or_garbled_manifest(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nothing")
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="invalid JSON"):
        load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(bundle_copy)


def test_wrong_channel_count_and_rate_are_refused_with_both_values(small_sim, trained, tmp_path):
    rec, _, _ = small_sim
    x = rec.get_traces(0, 30000)
    fewer = write_recording(tmp_path / "few.bin", x[:, :16], 30000.0, rec.probe.positions_um[:16], gain_to_uV=0.195)
    with pytest.raises(BundleError, match="has 16 channels but the bundle .* expects 32"):
        sort_recording(fewer, trained[1], progress=False)
    slower = write_recording(tmp_path / "slow.bin", x, 20000.0, rec.probe.positions_um, gain_to_uV=0.195)
    with pytest.raises(BundleError, match="sampled at 20000 Hz but the bundle .* expects 30000 Hz"):
        sort_recording(slower, trained[1], progress=False)
    moved = write_recording(tmp_path / "moved.bin", x, 30000.0, rec.probe.positions_um + [0, 5], gain_to_uV=0.195)
    with pytest.raises(BundleError, match="channel 0 is at"):
        sort_recording(moved, trained[1], progress=False)


def test_assigner_rejects_beyond_radius_and_maps_centroids_to_units():
    a = Assigner(np.array([[0, 0], [10, 0], [0, 10]], np.float32), [0, 1, 1], [1.0, 1.0, 2.0])
    unit, dist = a.assign(np.array([[0.5, 0], [10, 0.9], [0, 11.5], [5, 5], [0, 13]], np.float32))
    np.testing.assert_array_equal(unit, [0, 1, 1, -1, -1])
    np.testing.assert_allclose(dist[:3], [0.5, 0.9, 1.5], rtol=1e-5)
    unit, dist = a.assign(np.zeros((0, 2), np.float32))
    assert unit.shape == (0,)


def _gain_reference(x, templates_n, channel_index, channel, unit, max_shift):
    """NumPy definition of the template fit: best over shifts of 2 a <x, T> - a^2 |T|^2, a clipped."""
    lo, hi = AMPLITUDE_RANGE
    t_len = x.shape[0]
    best = -np.inf
    for s in range(-max_shift, max_shift + 1):
        tm = np.zeros_like(x)
        src = templates_n[unit][:, channel_index[channel]]
        if s >= 0:
            tm[s:] = src[:t_len - s]
        else:
            tm[:s] = src[-s:]
        dot, nrm = float((x * tm).sum()), float((tm * tm).sum())
        if nrm > 0:
            a = min(max(dot / nrm, lo), hi)
            best = max(best, 2 * a * dot - a * a * nrm)
    return best


def test_template_fit_picks_the_unit_whose_template_explains_the_snippet():
    """The compiled fit against its NumPy definition, the short list of nearest centroids, and the rejection."""
    rng = np.random.default_rng(1)
    n_units, t_len, n_chan, k_chan = 4, 30, 6, 3
    noise = rng.uniform(5, 15, n_chan).astype(np.float32)
    templates = (rng.normal(size=(n_units, t_len, n_chan)) * 40).astype(np.float32)
    channel_index = np.array([[(c + j) % n_chan for j in range(k_chan)] for c in range(n_chan)])
    matcher = TemplateMatcher(templates, noise, channel_index, max_shift=1, min_snr=10.0, min_scale=0.6)
    tn = templates / noise
    k = 60
    truth = rng.integers(0, n_units, k)
    channel = rng.integers(0, n_chan, k)
    shift = rng.integers(-1, 2, k)
    x = np.stack([np.roll(tn[u][:, channel_index[c]], s, axis=0) * rng.uniform(0.8, 1.2)
                  for u, c, s in zip(truth, channel, shift)]) + rng.normal(size=(k, t_len, k_chan))
    x = x.astype(np.float32)
    x[-5:] = rng.normal(size=(5, t_len, k_chan))  # noise alone: nothing explains it
    x[-6] = 0.3 * tn[truth[-6]][:, channel_index[channel[-6]]]  # a third of a template: a smaller neighbour's spike
    assert (x[-6] * x[-6]).sum() ** 0.5 > 10  # it would pass the matched filter alone
    candidates = np.tile(np.arange(n_units, dtype=np.int32), (k, 1))
    unit = np.zeros(k, np.int32)
    gain = matcher.match(x, channel, candidates, unit)
    want = np.array([[_gain_reference(x[i], tn, channel_index, channel[i], u, 1) for u in range(n_units)]
                     for i in range(k)])
    np.testing.assert_allclose(gain, want.max(axis=1), rtol=1e-4, atol=1e-2)
    np.testing.assert_array_equal(unit[:-6], truth[:-6])
    assert np.all(unit[-6:] == -1)
    # already rejected spikes stay rejected; a short list without the true unit cannot produce it
    unit = np.full(k, -1, np.int32)
    matcher.match(x, channel, candidates, unit)
    assert np.all(unit == -1)
    unit = np.zeros(k, np.int32)
    matcher.match(x, channel, np.where(candidates == truth[:, None], -1, candidates), unit)
    assert not np.any(unit == truth)
    # the Assigner's short list is the units of the nearest centroids, nearest first
    cents = np.array([[0, 0], [1, 0], [5, 0], [9, 0]], np.float32)
    a = Assigner(cents, [0, 1, 2, 3], [np.inf] * 4, matcher=matcher, candidates=2)
    feats = np.zeros((k, 2), np.float32)
    feats[:, 0] = np.where(truth < 2, 0.4, 7.5)  # the two nearest centroids hold the truth for units 0, 1, 2, 3
    unit, _ = a.assign(feats, x, channel)
    np.testing.assert_array_equal(unit[:-6], truth[:-6])
    # candidates (not deep) are not encoded: template fit among the units that peak on their snippet channels
    deep = np.arange(k) % 2 == 0
    unit, dist = a.label(feats[deep], x, channel, deep)
    ref_unit, ref_dist = a.assign(feats[deep], x[deep], channel[deep])
    np.testing.assert_array_equal(unit[deep], ref_unit)
    np.testing.assert_array_equal(dist[deep], ref_dist)
    assert np.all(np.isnan(dist[~deep]))
    near = np.array([truth[i] in matcher.near_units[channel[i]] for i in range(k)])
    shallow = ~deep & (np.arange(k) < k - 6)
    np.testing.assert_array_equal(unit[shallow & near], truth[shallow & near])
    assert np.all(unit[shallow & ~near] != truth[shallow & ~near])
    assert (shallow & near).sum() >= 5


def test_candidates_leave_only_when_a_template_claims_them(small_sim, trained):
    """Events shallower than amp_threshold are spikes only when labelled; the detector's own output keeps to spikes."""
    from rtsort.frontend import detect_recording

    rec, _, _ = small_sim
    b = load_bundle(trained[1])
    pipe = Pipeline(b, rec.gains_to_uV, rec.offsets_to_uV)
    spikes = np.concatenate([pipe.process(c.samples) for c in rec.iter_chunks(30000)])
    depth = np.float32(b.config.detect.amp_threshold) * b.noise_levels[1].astype(np.float32)
    cand = np.isnan(spikes["distance"])  # candidates are not encoded: no distance to a centroid
    assert cand.sum() > 0.02 * spikes.size  # candidates do add spikes
    assert np.all(spikes["unit"][cand] >= 0)
    assert np.all(np.abs(spikes["amplitude"][~cand]) >= depth[spikes["channel"][~cand]])
    shallow = np.abs(spikes["amplitude"]) < depth[spikes["channel"]]
    assert shallow.sum() and np.all(cand[shallow])  # shallow slope events and troughs alike
    events, _ = detect_recording(rec, b.config, progress=False, noise_levels=b.noise_levels)
    assert np.all(np.abs(events["amplitude"]) >= depth[events["channel"]]) and np.all(events["kind"] == SLOPE)
    # every spike leaves, labelled or not, but the tails (a big unit's late phase, clustered as a unit of its own)
    assert (b.centroid_unit == TAIL).any() and pipe.n_tails > 0
    assert events.size == int((~cand).sum()) + pipe.n_tails


def test_pipeline_chunk_by_chunk(small_sim, trained):
    rec, _, _ = small_sim
    pipe = Pipeline(trained[1], rec.gains_to_uV, rec.offsets_to_uV)
    pipe.warmup()
    got = [pipe.process(c.samples) for c in rec.iter_chunks(30, stop=90000)]
    spikes = np.concatenate(got)
    assert spikes.size > 50 and pipe.n_spikes == spikes.size
    assert spikes["unit"].min() >= -1 and spikes["unit"].max() < pipe.bundle.n_units
    assert np.all(np.diff(spikes["sample_index"]) >= -100)  # emitted in (nearly) time order


def test_runtime_never_imports_torch(small_sim, trained):
    rec, _, _ = small_sim
    code = (
        "import sys; import rtsort.pipeline as p; from rtsort.io import open_recording; "
        f"s, _ = p.sort_recording(open_recording({str(rec.source)!r}), {str(trained[1])!r}, progress=False); "
        "assert s.size > 0; mods = [m for m in sys.modules if m.split('.')[0] in ('torch', 'sklearn')]; "
        "print(mods); assert not mods"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr + res.stdout


def test_warmup_compiles_every_kernel_a_stream_uses(small_sim, trained):
    """After Pipeline.warmup, a stream of read-only int16 chunks (a memory-mapped file; a ZeroMQ frame is read-only
    too) and of float32 chunks compiles nothing more: a compilation mid-stream would stall it for a second."""
    rec, _, _ = small_sim
    code = (
        "import importlib, numpy as np; from numba.core.registry import CPUDispatcher; "
        "from rtsort.pipeline import Pipeline; from rtsort.io import open_recording; "
        "mods = [importlib.import_module('rtsort.' + m) for m in "
        "('peel', 'assign', 'detect', 'dsp', 'snippets', 'features', 'frontend', 'pipeline')]; "
        "ks = {m.__name__ + '.' + n: getattr(m, n) for m in mods for n in dir(m) "
        "if isinstance(getattr(m, n), CPUDispatcher)}; "
        f"rec = open_recording({str(rec.source)!r}); "
        f"pipe = Pipeline({str(trained[1])!r}, rec.gains_to_uV, rec.offsets_to_uV); pipe.warmup(); "
        "before = {n: len(k.signatures) for n, k in ks.items()}; "
        "raw = rec.get_traces(0, 60000); assert not raw.flags.writeable; n = 0; "
        "[pipe.process(raw[i:i + 30]) for i in range(0, 30000, 30)]; "
        "[pipe.process(raw[i:i + 30].astype(np.float32)) for i in range(30000, 60000, 30)]; "
        "after = {n: len(k.signatures) for n, k in ks.items()}; "
        "new = {n: after[n] - before[n] for n in ks if after[n] != before[n]}; "
        "assert pipe.n_spikes > 0 and pipe.peeler.n_peeled > 0, (pipe.n_spikes, pipe.peeler.n_peeled); "
        "print(new); assert not new"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout


def test_featurizer_kernel_matches_numpy_reference(trained):
    """The compiled per-spike pass gives what the NumPy definitions give (noise units, positions, features)."""
    from rtsort.features import normalize_waveforms, spike_locations
    from rtsort.frontend import FrontEnd
    from rtsort.pipeline import make_featurizer

    b = load_bundle(trained[1])
    fe = FrontEnd(b.config, b.probe, b.sampling_rate, noise_levels=b.noise_levels)
    f = make_featurizer(b, fe)
    rng = np.random.default_rng(0)
    k = 37
    wf = (rng.normal(size=(k, fe.snippets.n_samples, fe.snippets.k_channels)) * 20).astype(np.float32)
    ch = rng.integers(0, b.n_channels, k)
    latent, loc = f.parts(wf, ch)
    xn = normalize_waveforms(wf, ch, fe.snippets.channel_index, b.noise_levels[1])
    np.testing.assert_allclose(loc, spike_locations(xn, ch, b.probe.positions_um, fe.snippets.relative_positions),
                               atol=1e-3)
    np.testing.assert_allclose(latent, f.encoder(xn, fe.snippets.relative_positions[ch]), atol=1e-5)
    feats = f.combine(latent, loc)
    unit, dist = Assigner(b.centroids, b.centroid_unit, b.centroid_radius).assign(feats)
    d = np.linalg.norm(feats[:, None, :].astype(np.float64) - b.centroids[None].astype(np.float64), axis=2)
    np.testing.assert_allclose(dist, d.min(axis=1), rtol=1e-5)
    want = np.where(d.min(axis=1) <= b.centroid_radius[d.argmin(axis=1)], b.centroid_unit[d.argmin(axis=1)], -1)
    np.testing.assert_array_equal(unit, want)


def test_phy_export_and_curation_round_trip(small_sim, trained, tmp_path):
    """Export to Phy, curate as a person would (merge two units, call one noise), apply: the new bundle sorts so."""
    import csv

    from rtsort.io.spikes import save_spikes
    from rtsort.train.curate import apply_curation

    rec, _, _ = small_sim
    spikes, _ = sort_recording(rec, trained[1], progress=False)
    sp = save_spikes(tmp_path / "s.npz", spikes, rec.sampling_rate)
    phy = tmp_path / "phy"
    r = subprocess.run([sys.executable, "-m", "rtsort", "-q", "phy", str(sp), "--bundle", str(trained[1]),
                        "--recording", str(rec.source), "--out", str(phy)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    b = load_bundle(trained[1])
    times = np.load(phy / "spike_times.npy")
    clusters = np.load(phy / "spike_clusters.npy")
    tm = np.load(phy / "templates.npy")
    assert times.dtype == np.uint64 and np.array_equal(times, spikes["sample_index"])
    assert tm.shape == (b.n_units + 1,) + b.templates.shape[1:]  # + the unassigned cluster
    assert np.array_equal(clusters, np.where(spikes["unit"] >= 0, spikes["unit"], b.n_units))
    assert "dat_path" in (phy / "params.py").read_text()
    counts = np.bincount(spikes["unit"][spikes["unit"] >= 0], minlength=b.n_units)
    a, c, noise = np.argsort(counts)[::-1][:3]  # merge c into a; call noise "noise"
    curated = np.where(clusters == c, a, clusters).astype(np.int32)
    np.save(phy / "spike_clusters.npy", curated)
    with open(phy / "cluster_group.tsv", "a", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerow((int(noise), "noise"))
    out = tmp_path / "curated"
    summary = apply_curation(trained[1], phy, rec, out, progress=False)
    nb = load_bundle(out)
    assert nb.n_units == summary["units_after"] == b.n_units - 2  # one merged away, one called noise
    assert (nb.centroid_unit == -1).any()
    # the tails' centroids are not in Phy (their events never left) and carry over as they were
    tails = b.centroid_unit == TAIL
    assert tails.any() and summary["tail_centroids"] == int(tails.sum())
    np.testing.assert_array_equal(nb.centroids[nb.centroid_unit == TAIL], b.centroids[tails])
    new, _ = sort_recording(rec, out, progress=False)
    # the deep spikes are the same; shallow candidates are spikes only when a unit's template claims them
    key = lambda s: s["sample_index"] * 1000 + s["channel"]  # noqa: E731
    _, i_new, i_old = np.intersect1d(key(new), key(spikes), return_indices=True)
    assert i_old.size >= 0.95 * spikes.size
    new, curated = new[i_new], curated[i_old]
    phy_of_unit = {u["unit"]: u["phy_cluster"] for u in nb.units}
    relabelled = np.array([phy_of_unit.get(int(u), -1) for u in new["unit"]])
    want = np.where(curated == b.n_units, -1, curated)  # what the curator asked for, in Phy's ids
    want = np.where(want == noise, -1, want)
    assert np.mean(relabelled == want) >= 0.95
    assert np.mean(new["unit"][curated == noise] < 0) >= 0.9  # noise stays unassigned
    # the unit table counts what the curated bundle's first pass emits (its templates re-estimated from its sort)
    nb.config = replace(nb.config, assign=replace(nb.config.assign, peel=False))
    first, _ = sort_recording(rec, nb, progress=False)
    n_first = np.bincount(first["unit"][first["unit"] >= 0], minlength=nb.n_units)
    n_table = np.array([u["n_spikes"] for u in nb.units])
    # (within 1 %: a candidate the new templates claim that the old bundle left is not among Phy's spikes)
    assert np.abs(n_first - n_table).sum() <= 0.01 * n_first.sum(), (n_first, n_table)
    other = tmp_path / "other"
    shutil.copytree(trained[1], other)
    (other / "manifest.json").write_text((other / "manifest.json").read_text().replace('"created"', '"created" ', 1))
    with pytest.raises(BundleError, match="exported from bundle"):
        apply_curation(other, phy, rec, tmp_path / "x", progress=False)


def test_centroid_tracking_is_chunk_invariant_and_moves_centroids(small_sim, trained):
    """With [assign] track_rate > 0, labels still do not depend on the chunking, and the centroids do follow."""
    rec, _, _ = small_sim
    a, _ = sort_recording(rec, trained[1], chunk_s=1.0, progress=False, track_rate=0.2)
    b, _ = sort_recording(rec, trained[1], chunk_s=0.0137, progress=False, track_rate=0.2)
    for name in a.dtype.names:  # field by field: candidates' distances are NaN
        np.testing.assert_array_equal(a[name], b[name])
    pipe = Pipeline(trained[1], rec.gains_to_uV, rec.offsets_to_uV, track_rate=0.2)
    pipe.warmup()
    before = pipe.assigner.centroids.copy()
    np.testing.assert_array_equal(before, load_bundle(trained[1]).centroids)  # warming up moved nothing
    pipe.process(rec.get_traces(0, rec.n_samples))
    assert not np.array_equal(pipe.assigner.centroids, before)
    static, _ = sort_recording(rec, trained[1], progress=False)
    b = load_bundle(trained[1])
    deep = lambda s: s[np.isfinite(s["distance"])]  # noqa: E731  (the spikes; candidates may differ)
    # the same spikes leave, but for the odd one that tracking moved into or out of a tail centroid's reach
    moved = np.setxor1d(deep(static)["sample_index"], deep(a)["sample_index"])
    assert moved.size <= 0.01 * deep(static).size, moved.size
    with pytest.raises(Exception, match="track_rate"):
        Pipeline(trained[1], track_rate=1.5)


def test_a_candidate_must_leave_little_residual_a_spike_need_not():
    """[assign] candidate_max_residual: a candidate that a template matches but does not explain (the tail of a
    bigger spike on top) is not claimed; a deep spike with the same snippet (a collision) keeps its unit."""
    rng = np.random.default_rng(3)
    t_len, n_chan = 30, 3
    noise = np.ones(n_chan, np.float32)
    templates = (rng.normal(size=(1, t_len, n_chan)) * 3).astype(np.float32)  # |T| about 28
    channel_index = np.arange(n_chan)[None, :].repeat(n_chan, 0)
    clean = templates[0] + rng.normal(size=(t_len, n_chan)).astype(np.float32)
    other = (rng.normal(size=(t_len, n_chan)) * 4).astype(np.float32)  # another unit's waveform: 16 per sample
    x = np.stack([clean, clean + other]).astype(np.float32)
    ch = np.zeros(2, np.int64)
    cents = np.zeros((1, 2), np.float32)
    for max_residual, want in ((1.5, [0, -1]), (np.inf, [0, 0])):
        m = TemplateMatcher(templates, noise, channel_index, max_shift=1, min_snr=10.0, min_scale=0.6,
                            max_residual=max_residual)
        a = Assigner(cents, [0], [np.inf], matcher=m, candidates=1)
        unit, _ = a.label(np.zeros((0, 2), np.float32), x, ch, np.zeros(2, bool))  # candidates
        assert unit.tolist() == want, max_residual
        unit, _ = a.label(np.zeros((2, 2), np.float32), x, ch, np.ones(2, bool))  # spikes: residual not limited
        assert unit.tolist() == [0, 0]


def test_a_candidate_must_have_its_units_footprint():
    """[assign] candidate_max_footprint: a neighbour's spike, the same time course on other channels, that a
    unit's template matches well enough for every other gate is not claimed: its residual, projected channel by
    channel onto the template's time course, holds the channels that differ. The unit's own spikes, at any
    usual size, are."""
    rng = np.random.default_rng(4)
    t_len, n_chan, n = 30, 6, 200
    t = np.arange(t_len)
    course = -np.exp(-(t - 10.0) ** 2 / 6.0) + 0.4 * np.exp(-(t - 17.0) ** 2 / 16.0)
    own = np.array([7.0, 3.0, 2.0, 1.0, 0.0, 0.0])  # noise units: |T| about 15
    neighbour = np.array([4.5, 5.0, 0.0, 3.5, 2.0, 0.0])
    templates = (course[:, None] * own[None, :])[None].astype(np.float32)
    spikes = rng.uniform(0.8, 1.2, n)[:, None, None] * templates[0] + rng.normal(size=(n, t_len, n_chan))
    others = (course[:, None] * neighbour[None, :])[None] + rng.normal(size=(n, t_len, n_chan))
    x = np.concatenate([spikes, others]).astype(np.float32)
    ch = np.zeros(2 * n, np.int64)
    claimed, as_spikes = {}, []
    for limit in (np.inf, 3.0):
        m = TemplateMatcher(templates, np.ones(n_chan, np.float32), np.arange(n_chan)[None, :].repeat(n_chan, 0),
                            max_shift=1, min_snr=10.0, min_scale=0.6, max_residual=1.0, max_footprint=limit)
        a = Assigner(np.zeros((1, 2), np.float32), [0], [np.inf], matcher=m, candidates=1)
        unit, _ = a.label(np.zeros((0, 2), np.float32), x, ch, np.zeros(2 * n, bool))  # candidates
        claimed[limit] = (np.mean(unit[:n] == 0), np.mean(unit[n:] == 0))
        as_spikes.append(a.label(np.zeros((2 * n, 2), np.float32), x, ch, np.ones(2 * n, bool))[0])
    np.testing.assert_array_equal(as_spikes[0], as_spikes[1])  # a spike's footprint is not limited (collisions)
    assert claimed[np.inf][0] == 1.0 and claimed[np.inf][1] >= 0.3, claimed  # the other gates pass many
    assert claimed[3.0][0] == 1.0 and claimed[3.0][1] <= 0.05, claimed


def test_late_phase_explained_by_an_earlier_spikes_template_whatever_the_chunking():
    """[assign] late_phase_residual > 0: an event that an earlier labelled spike's template explains (the event
    minus the template's prediction at its channel and time is too shallow to be detected) is that spike's late
    phase. Not when the template predicts too little there (another channel, past its end), when a spike deeper
    than the prediction remains (a collision), when the earlier spike has no unit, or within the due spread; the
    same events for any split into chunks."""
    n_before, t_len, n_ch = 10, 40, 3
    templates = np.zeros((1, t_len, n_ch), np.float32)
    templates[0, n_before, 0] = -200.0  # the trough
    templates[0, n_before + 15, 0] = -80.0  # a late trough 15 samples on, on the same channel
    templates[0, n_before + 15, 1] = -10.0  # ... and a small one on channel 1
    spike_depth = np.full(n_ch, 45.0)  # 4.5 x 10 uV noise
    event_depth = np.full(n_ch, 25.0)  # the lowest threshold: 2.5 x noise
    rows = [  # sample, channel, amplitude, unit, a spike?, explained?
        (100, 0, -200.0, 0, True, False),  # the spike
        (115, 0, -90.0, 0, True, True),  # its late trough: -90 + 80 = -10, too shallow to detect
        (116, 0, -70.0, -1, False, True),  # a candidate there, one sample off (the best of -1..+1)
        (115, 1, -60.0, 0, True, False),  # channel 1: -60 + 10 = -50, still a spike
        (115, 2, -30.0, 0, False, False),  # channel 2: the template predicts nothing
        (200, 0, -200.0, -1, True, False),  # an unlabelled spike ...
        (215, 0, -90.0, 0, True, False),  # ... explains nothing
        (300, 0, -200.0, 0, True, False),  # a spike ...
        (315, 0, -180.0, 0, True, False),  # ... and a collision: -180 + 80 = -100 is still a spike
        (302, 0, -60.0, 0, True, False),  # within the due spread (2): not judged by this spike
        (360, 0, -90.0, 0, True, False),  # past the template's end
    ]
    ev = np.zeros(len(rows), EVENT_DTYPE)
    ev["sample_index"], ev["channel"], ev["amplitude"] = ([r[i] for r in rows] for i in range(3))
    units = np.array([r[3] for r in rows], np.int32)
    deep = np.array([r[4] for r in rows])
    want = [r[5] for r in rows]
    keep = np.ones(len(rows), bool)
    order = np.argsort(ev["sample_index"], kind="stable")
    ev, units, deep, keep, want = ev[order], units[order], deep[order], keep[order], np.array(want)[order].tolist()
    for splits in ([], [1], [2, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]):
        rule = LatePhase(templates, n_before, spike_depth, event_depth, due_spread=2)
        got = np.concatenate([rule(*parts) for parts in zip(*(np.split(a, splits) for a in (ev, units, keep,
                                                                                            deep)))])
        assert got.tolist() == want, splits
    off = LatePhase(templates, n_before, spike_depth, event_depth, due_spread=2, enabled=False)
    assert not off(ev, units, keep, deep).any()  # late_phase_residual = 0: never
    assert LatePhase(templates, n_before, spike_depth, event_depth, due_spread=20).lo == 21  # chunk invariant


def test_amplitude_prior_prefers_a_template_at_its_own_size():
    """[assign] amplitude_prior: a spike of unit 0 at its usual size, with noise that leans towards a smaller
    neighbour's shape, is explained a little better by that neighbour's template stretched 1.5 times. Scale-free,
    the neighbour takes it; with the prior, which charges (a - 1)^2 |T|^2 for the stretch, unit 0 keeps it."""
    rng = np.random.default_rng(5)
    t_len, n_chan = 30, 3
    shape = rng.normal(size=(t_len, n_chan)) * 3  # |T| about 28
    lean = rng.normal(size=(t_len, n_chan))
    lean -= shape * (lean * shape).sum() / (shape * shape).sum()  # what tells the neighbour from unit 0
    lean *= 6.0 / np.sqrt((lean * lean).sum())
    templates = np.stack([shape, (shape + lean) / 1.5]).astype(np.float32)
    x = (shape + 0.9 * lean + 0.3 * rng.normal(size=(t_len, n_chan))).astype(np.float32)[None]
    noise = np.ones(n_chan, np.float32)
    channel_index = np.arange(n_chan)[None, :].repeat(n_chan, 0)
    candidates = np.array([[0, 1]], np.int32)
    for prior, want in ((0.0, 1), (1.0, 0)):
        m = TemplateMatcher(templates, noise, channel_index, max_shift=0, min_snr=10.0, min_scale=0.6,
                            amplitude_prior=prior)
        unit = np.zeros(1, np.int32)
        gain = m.match(x, np.zeros(1, np.int64), candidates, unit)
        assert unit[0] == want, prior
        # the gain reported is the chosen unit's own scale-free fit (what the residual limit judges)
        np.testing.assert_allclose(gain[0], _gain_reference(x[0], templates, channel_index, 0, want, 0),
                                   rtol=1e-4)


def test_peeling_finds_the_spike_a_bigger_neighbour_hides(small_sim, trained):
    """Two neighbouring units firing 0.3 ms apart: the first pass keeps the bigger spike only (the detector
    suppresses the smaller slope nearby); peeling subtracts the bigger one's template and finds the other, and
    finds nothing where there is nothing."""

    rec, _, _ = small_sim
    b = load_bundle(trained[1])
    peak = np.abs(b.templates).max(axis=1).argmax(axis=1)
    size = np.abs(b.templates).max(axis=(1, 2)) / b.noise_levels[1][peak]  # noise units
    pos = b.probe.positions_um
    d = np.linalg.norm(pos[peak][:, None] - pos[peak][None], axis=2)
    # a big unit and a smaller neighbour 15-45 um away that is a spike by itself (>= 7 x noise)
    pairs = np.argwhere((d >= 15) & (d <= 45) & (size[None, :] >= 7) & (size[:, None] >= 1.5 * size[None, :]))
    big, small = pairs[np.argmax(size[pairs[:, 0]] / size[pairs[:, 1]])]
    rng = np.random.default_rng(2)
    n, nb, lag = 90000, b.manifest["features"]["n_before"], 9
    x = rng.normal(size=(n, rec.n_channels)).astype(np.float32) * b.noise_levels[1][None, :]
    times = np.arange(3000, n - 3000, 600)
    for t in times:
        x[t - nb : t - nb + b.templates.shape[1]] += b.templates[big]
        x[t + lag - nb : t + lag - nb + b.templates.shape[1]] += b.templates[small]
    found = {}
    for peel in (False, True):  # the pipeline after its filter: the templates are what the filter gave
        b.config = replace(b.config, assign=replace(b.config.assign, peel=peel))
        pipe = Pipeline(b)
        spikes = np.concatenate([pipe.process_filtered(x[i : i + 3000]) for i in range(0, n, 3000)])
        s = spikes[spikes["unit"] == small]["sample_index"]
        found[peel] = np.isin(times + lag, s + np.arange(-3, 4)[:, None]).mean()
        bigs = spikes[spikes["unit"] == big]["sample_index"]
        assert np.isin(times, bigs + np.arange(-2, 3)[:, None]).mean() >= 0.9  # the big spike is found either way
    assert found[False] < 0.5 and found[True] >= 0.8, found
    assert pipe.peeler.n_peeled <= 1.1 * times.size  # no more than the hidden spikes (and the odd noise event)


def test_peeling_does_not_find_the_tails_again(small_sim, trained):
    """A tail's late phase lies past its unit's template, so the residual still holds it: the second pass must
    not emit it as a spike (the first pass's dropped tails count as known events)."""
    rec, _, _ = small_sim
    pipe = Pipeline(trained[1], rec.gains_to_uV, rec.offsets_to_uV)
    tails, peeled = [], []
    for c in rec.iter_chunks(30000):
        f = pipe.front.preprocessor.process(c.samples)
        g, spikes, xn, dropped = pipe.first_pass(f)
        out = pipe.peel(g, spikes, xn, dropped)
        tails.append(dropped)
        peeled.append(out[out.size - pipe.last_peeled :])
    tails, peeled = np.concatenate(tails), np.concatenate(peeled)
    assert tails.size > 100 and tails.size == pipe.n_tails
    pos = rec.probe.positions_um
    for p in peeled:
        near = (np.abs(tails["sample_index"] - p["sample_index"]) <= 1) & \
            (np.linalg.norm(pos[tails["channel"]] - pos[p["channel"]], axis=1) <= 40)
        assert not near.any(), p


def _weak_unit_stream(probe, n, noise_uV, times, nb, peak_sigma, seed):
    """White noise on every channel and one broad, weak unit (its trough ``peak_sigma`` x noise, under every
    detector threshold) at ``times``; returns (samples, template uV)."""
    t_len = 39
    tau = np.arange(t_len) - nb
    shape = -np.exp(-0.5 * (tau / 4.0) ** 2) + 0.3 * np.exp(-0.5 * ((tau - 11) / 5.0) ** 2)  # trough, then a bump
    pos = probe.positions_um
    centre = pos[np.argmin(np.linalg.norm(pos - pos.mean(axis=0), axis=1))]
    footprint = np.exp(-0.5 * (np.linalg.norm(pos - centre, axis=1) / 60.0) ** 2)
    template = (peak_sigma * noise_uV * shape[:, None] * footprint[None, :]).astype(np.float32)
    x = np.random.default_rng(seed).normal(size=(n, probe.n_channels)).astype(np.float32) * noise_uV
    for t in times:
        x[t - nb : t - nb + t_len] += template
    return x, template


def _weak_unit_setup(small_sim, spacing: int, seed: int):
    """A weak unit every ``spacing`` samples in 4 s of 10 uV noise (:func:`_weak_unit_stream`), a calibrated
    front end and the runtime's matcher for its template: (rec, cfg, times, x, template, front, matcher)."""
    from rtsort.config import Config
    from rtsort.frontend import FrontEnd

    rec, _, _ = small_sim
    cfg = Config()
    n, nb = 120000, 18
    times = np.arange(2000, n - 2000, spacing)
    x, template = _weak_unit_stream(rec.probe, n, 10.0, times, nb, 2.2, seed=seed)
    front = FrontEnd(cfg, rec.probe, rec.sampling_rate, snippets=True)
    front.detector.noise_levels = front.detector.calibrate(x[:30000])
    assert front.snippets.nbefore == nb and front.snippets.n_samples == template.shape[0]
    matcher = TemplateMatcher(template[None], front.noise_levels[1], front.snippets.channel_index, max_shift=1,
                              min_snr=cfg.assign.template_min_snr, min_scale=cfg.assign.template_min_scale,
                              max_residual=cfg.assign.candidate_max_residual)
    return rec, cfg, times, x, template, front, matcher


def test_search_finds_spikes_under_the_detector_thresholds(small_sim):
    """[assign] search: a unit whose spikes reach 2.2 x noise on any one channel (under the candidates' 2.5 and
    the troughs' 3.0) but spread over many channels: the detector sees no spike there and peeling finds none,
    the matched filter of its template on the residual finds most, in pure noise it finds next to nothing, and
    chunking changes nothing."""

    from rtsort.frontend import FrontEnd
    from rtsort.peel import Peeler

    rec, cfg, times, x, template, front, matcher = _weak_unit_setup(small_sim, 700, seed=4)
    n, noise_uV = x.shape[0], 10.0
    z_expected = np.sqrt((matcher.templates[0][:, matcher.channel_index[np.abs(template).max(0).argmax()]] ** 2).sum())
    assert z_expected >= 14  # the matched filter's reach; no channel alone gets there

    def run(search, data, chunk):
        c = replace(cfg, assign=replace(cfg.assign, search=search))
        f = FrontEnd(c, rec.probe, rec.sampling_rate, noise_levels=front.noise_levels)
        peeler = Peeler(f, template[None], matcher)
        peeler.warmup()
        none = np.zeros(0, dtype=[("sample_index", "<i8"), ("unit", "<i4"), ("channel", "<i4"),
                                  ("amplitude", "<f4"), ("distance", "<f4")])
        events = [f.process_filtered(data[i : i + chunk]).events for i in range(0, data.shape[0], chunk)]
        found = [peeler.process(data[i : i + chunk], none, None, none) for i in range(0, data.shape[0], chunk)]
        ev = np.concatenate([e for e, _, _ in found])
        return np.concatenate(events), ev, np.concatenate([u for _, u, _ in found]), peeler

    events, _, _, _ = run(False, x, 3000)
    deep = events[front.spike_mask(events)]  # the detector's spikes (its shallower events are noise crossings)
    assert np.isin(times, deep["sample_index"] + np.arange(-12, 13)[:, None]).mean() < 0.1
    _, ev, unit, _ = run(False, x, 3000)  # peeling alone looks at the detector's spikes
    assert np.isin(times, ev["sample_index"] + np.arange(-2, 3)[:, None]).mean() < 0.1
    _, ev, unit, peeler = run(True, x, 3000)
    hit = np.isin(times, ev["sample_index"] + np.arange(-2, 3)[:, None])
    assert hit.mean() >= 0.8, hit.mean()
    assert (unit == 0).all() and ev.size <= 1.05 * times.size
    assert peeler.n_matched == np.count_nonzero(ev["kind"] == MATCH) >= 0.8 * times.size  # the search's
    _, ev_small, unit_small, _ = run(True, x, 37)  # odd chunks: the same spikes, to the sample (in time order)
    o, o_small = np.argsort(ev["sample_index"], kind="stable"), np.argsort(ev_small["sample_index"], kind="stable")
    np.testing.assert_array_equal(ev_small[o_small], ev[o])
    np.testing.assert_array_equal(unit_small[o_small], unit[o])
    quiet = np.random.default_rng(9).normal(size=(n, rec.n_channels)).astype(np.float32) * noise_uV
    _, ev_noise, _, _ = run(True, quiet, 3000)
    assert ev_noise.size <= 0.02 * times.size, ev_noise.size  # in noise alone: next to nothing


def test_search_takes_no_late_phase_for_a_weak_units_spike(small_sim):
    """A broad, slow deflection (a big spike's late phase, past its template's end) over a weak unit's
    channels passes the search's matched filter gate, but its template's fit leaves far more residual than a
    candidate may: no match there, while the unit's own spikes are still found."""
    from rtsort.frontend import FrontEnd
    from rtsort.peel import Peeler

    rec, cfg, times, x, template, front, matcher = _weak_unit_setup(small_sim, 1400, seed=5)
    n, nb, noise_uV = x.shape[0], front.snippets.nbefore, 10.0
    # the late phase: as deep as the unit's trough, three times as slow, on the same channels, between its spikes
    tau = np.arange(-60, 61)
    slow = -np.exp(-0.5 * (tau / 12.0) ** 2)
    footprint = np.abs(template).max(axis=0) / np.abs(template).max()
    bumps = times[:-1] + 700
    for t in bumps:
        x[t - 60 : t + 61] += 1.05 * 2.2 * noise_uV * slow[:, None] * footprint[None, :]
    peak = int(np.abs(template).max(axis=0).argmax())
    tn = matcher.templates[0][:, matcher.channel_index[peak]]
    win = x[bumps[0] - nb : bumps[0] - nb + tn.shape[0]][:, matcher.channel_index[peak]] / front.noise_levels[1][
        matcher.channel_index[peak]]
    z, scale = (win * tn).sum() / np.sqrt((tn ** 2).sum()), (win * tn).sum() / (tn ** 2).sum()
    assert z >= cfg.assign.template_min_snr + 2 and 0.8 <= scale <= 1.4  # the matched filter's gates pass it

    peeler = Peeler(FrontEnd(cfg, rec.probe, rec.sampling_rate, noise_levels=front.noise_levels), template[None],
                    matcher)
    peeler.warmup()
    none = np.zeros(0, dtype=[("sample_index", "<i8"), ("unit", "<i4"), ("channel", "<i4"), ("amplitude", "<f4"),
                              ("distance", "<f4")])
    ev = np.concatenate([peeler.process(x[i : i + 3000], none, None, none)[0] for i in range(0, n, 3000)])
    on_bumps = np.isin(ev["sample_index"], bumps + np.arange(-40, 41)[:, None])
    assert on_bumps.sum() <= 0.05 * bumps.size, on_bumps.sum()
    assert np.isin(times, ev["sample_index"] + np.arange(-2, 3)[:, None]).mean() >= 0.8
