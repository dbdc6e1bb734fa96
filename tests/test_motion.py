"""Motion correction: resampling, the causal tracker against a simulated drift, chunk invariance, and accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from rtsort.config import Config, MotionConfig
from rtsort.errors import ConfigError
from rtsort.io import open_recording
from rtsort.motion import Kriging, MotionSchedule, motion_enabled, spatial_windows
from rtsort.types import Probe

pytest.importorskip("spikeinterface")

DRIFT_UM = 12.0  # zigzag amplitude: the probe moves +-12 um
DURATION_S = 40.0


def _probe(n_channels: int) -> Probe:
    y = np.repeat(np.arange(n_channels // 2) * 20.0, 2)
    x = np.tile([0.0, 20.0], n_channels // 2)
    return Probe(np.stack([x, y], axis=1))


def test_kriging_is_the_identity_at_zero_and_moves_a_profile():
    probe = _probe(32)
    k = Kriging(probe.positions_um, 40.0)
    rows = k.grid(np.zeros(32))
    assert np.all(k.weights[rows, np.arange(32), 0] == 1.0) and np.all(k.weights[rows, np.arange(32), 1:] == 0)
    # a smooth spatial profile, resampled 20 um (one row) up, is the profile one row further on
    y = probe.positions_um[:, 1]
    x = np.exp(-0.5 * ((y - 150.0) / 40.0) ** 2).astype(np.float32)[None, :]
    mc = MotionSchedule(probe, 30000.0, MotionConfig(mode="rigid", max_um=40.0), np.array([[20.0]]))
    out = np.empty_like(x)
    mc.apply(x, out)
    inner = (y >= 40) & (y <= 260)  # the target stays inside the probe (0-300 um)
    expected = np.exp(-0.5 * ((y + 20.0 - 150.0) / 40.0) ** 2)
    assert np.max(np.abs(out[0, inner] - expected[inner])) < 0.05


def test_motion_config_and_windows():
    assert not motion_enabled(MotionConfig(), _probe(16))  # 140 um: too short to register on
    assert motion_enabled(MotionConfig(), _probe(64))
    assert not motion_enabled(MotionConfig(mode="off"), _probe(64))
    assert spatial_windows(_probe(64), MotionConfig(mode="rigid")).size == 1
    assert spatial_windows(_probe(128), MotionConfig(mode="nonrigid", window_um=400.0)).size == 3
    with pytest.raises(ConfigError, match="motion.mode"):
        MotionConfig(mode="sideways")
    with pytest.raises(ConfigError, match="step_s"):
        Config.from_dict({"motion": {"step_s": 0.01}})


@pytest.fixture(scope="module")
def drifting(tmp_path_factory):
    """40 s of a 64-channel probe (620 um) with 20 units, moving +-12 um in a 30 s zigzag, and its bundle."""
    from spikeinterface.core.generate import generate_sorting
    from spikeinterface.generation import generate_drifting_recording

    from rtsort.sim import _UNIT_PARAMS, make_probe, write_ground_truth
    from rtsort.train import train_bundle

    root = tmp_path_factory.mktemp("drift")
    fs, n_units = 30000.0, 20
    probe = make_probe(64)
    sorting = generate_sorting(num_units=n_units, sampling_frequency=fs, durations=[DURATION_S],
                               firing_rates=(4.0, 12.0), refractory_period_ms=4.0, seed=4711)
    _, rec, _, extra = generate_drifting_recording(
        num_units=n_units, duration=DURATION_S, sampling_frequency=fs, probe=probe, sorting=sorting,
        generate_templates_kwargs=dict(ms_before=1.0, ms_after=3.0, mode="ellipsoid",
                                       unit_params=dict(_UNIT_PARAMS, alpha=(150.0, 420.0), ellipse_shrink=(0.4, 1),
                                                        ellipse_angle=(0, 2 * np.pi))),
        generate_displacement_vector_kwargs=dict(
            displacement_sampling_frequency=5.0, drift_start_um=[0, DRIFT_UM], drift_stop_um=[0, -DRIFT_UM],
            drift_step_um=1, motion_list=[dict(drift_mode="zigzag", non_rigid_gradient=None, t_start_drift=0.0,
                                               t_end_drift=None, period_s=30.0)]),
        generate_noise_kwargs=dict(noise_levels=(10.0, 10.0), spatial_decay=25.0), extra_outputs=True, seed=4711)
    t = extra["templates"]
    write_ground_truth(root, rec, sorting, probe.contact_positions[:, :2], t.templates_array, int(t.nbefore),
                       np.asarray(extra["unit_locations"]), 10.0, meta={"drift": "zigzag"}, progress=False)
    truth_disp = extra["unit_displacements"][:, :, 1].mean(axis=1)  # rigid: every unit moves alike (5 Hz)
    recording = open_recording(root / "recording.bin")
    result = train_bundle(recording, root / "bundle", Config(), seed=0, progress=False)
    return recording, root, truth_disp, result


def _track(recording, bundle, chunk: int, stop: int):
    """The tracker's displacement after each chunk, and the spikes, for ``chunk``-sample chunks up to ``stop``."""
    from rtsort.pipeline import Pipeline

    pipe = Pipeline(bundle, recording.gains_to_uV, recording.offsets_to_uV)
    assert pipe.front.motion is not None
    pipe.warmup()
    pipe.reset(0)
    spikes, est = [], []
    for s in range(0, stop, chunk):
        spikes.append(pipe.process(recording.get_traces(s, min(s + chunk, stop))))
        est.append((min(s + chunk, stop), pipe.front.motion.window_disp.mean()))
    return np.concatenate(spikes), np.array(est)


def test_tracker_follows_a_simulated_drift(drifting):
    recording, root, truth_disp, result = drifting
    assert result.history is not None
    _, est = _track(recording, root / "bundle", 15000, recording.n_samples)
    t = est[:, 0] / recording.sampling_rate
    truth = np.interp(t, np.arange(truth_disp.size) / 5.0, truth_disp)
    truth -= truth_disp[: int(5.0 * 1.0)].mean()  # the bundle's frame: the probe over the first second
    after = t >= 5.0  # warm-up: the tracker's memory fills
    err = np.abs(est[after, 1] - truth[after])
    assert err.max() < 5.0, f"tracking error up to {err.max():.1f} um (median {np.median(err):.1f})"
    assert np.ptp(est[after, 1]) > 1.5 * DRIFT_UM  # it moved with the probe, not stayed at 0


def test_motion_correction_is_chunk_invariant(drifting):
    recording, root, _, _ = drifting
    stop = int(8 * recording.sampling_rate)  # 16 displacement updates
    a, ea = _track(recording, root / "bundle", 30000, stop)
    b, eb = _track(recording, root / "bundle", 1013, stop)
    for f in ("sample_index", "unit", "channel"):
        np.testing.assert_array_equal(np.sort(a[f]), np.sort(b[f]))
    np.testing.assert_allclose(ea[-1, 1], eb[-1, 1], atol=1e-9)
    assert abs(ea[-1, 1]) > 0.5  # the displacement did change over these updates


def test_a_drifting_recording_sorts_well(drifting):
    from rtsort.evaluate import sorting_accuracy
    from rtsort.pipeline import sort_recording

    recording, root, _, _ = drifting
    spikes, _ = sort_recording(recording, root / "bundle", progress=False)
    truth = np.load(root / "truth.npz")
    acc = sorting_accuracy(spikes["sample_index"], spikes["unit"], truth["sample_index"], truth["unit"],
                           recording.sampling_rate)["summary"]
    assert acc["well_detected"] >= 14, acc  # of 20
    assert acc["mean_accuracy"] >= 0.7, acc


def test_tracker_leaves_out_a_noisy_channel(drifting):
    """A channel of pure noise at 10x fires hundreds of spikes a second at one depth: the tracker leaves them
    out and keeps following the probe; without the check they pull it off."""
    recording, root, truth_disp, _ = drifting
    fs = recording.sampling_rate
    a, b, ch = int(8 * fs), int(14 * fs), 40
    rng = np.random.default_rng(1)
    noise = rng.normal(0.0, 10.0 * 10.0, b - a) / recording.gains_to_uV[ch]  # 10x the recording's 10 uV

    def noisy_traces(start, stop):
        x = recording.get_traces(start, stop).astype(np.float32)
        lo, hi = max(start, a), min(stop, b)
        if lo < hi:
            x[lo - start:hi - start, ch] += noise[lo - a:hi - a]
        return x

    def track(check: bool):
        from rtsort.pipeline import Pipeline

        pipe = Pipeline(root / "bundle", recording.gains_to_uV, recording.offsets_to_uV)
        if not check:
            pipe.front.motion.noise_uV = None
        pipe.warmup()
        pipe.reset(0)
        err = []
        for s in range(0, int(16 * fs), 15000):
            pipe.process(noisy_traces(s, s + 15000))
            t = (s + 15000) / fs
            truth = np.interp(t, np.arange(truth_disp.size) / 5.0, truth_disp) - truth_disp[:5].mean()
            if t > a / fs:
                err.append(abs(pipe.front.motion.window_disp.mean() - truth))
        return max(err), pipe.front.motion.excluded

    err, excluded = track(True)
    err_unchecked, excluded_unchecked = track(False)
    print(f"NOISY tracking error with the check {err:.1f} um ({excluded} spikes left out), "
          f"without {err_unchecked:.1f} um")
    assert excluded > 500 and excluded_unchecked == 0
    assert err < 5.0
    assert err_unchecked > err + 2.0
