"""Training's motion estimate: DREDge (SpikeInterface) over the whole recording, and the tracker's reference.

One pass of the streaming front end (no correction) detects and locates the
spikes; SpikeInterface's ``estimate_motion(method="dredge_ap")`` registers
their depth x amplitude rasters over time. The displacement is expressed
relative to the recording's start (its first ``tau_s``), which becomes the
bundle's reference frame: training learns units there, and the runtime's
tracker starts from zero displacement there. The reference histogram is the
training spikes' depths moved into that frame.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from ..config import Config
from ..errors import RtsortError
from ..frontend import snippets_recording
from ..motion import MotionSchedule, motion_enabled, reference_histogram, spatial_windows, spike_depths

log = logging.getLogger("rtsort.train.motion")


def locate_spikes(recording, config: Config, progress: bool = True):
    """Every spike's trough sample, peak channel, depth (um) and amplitude (noise units), uncorrected."""
    rows = []

    def locate(fe, ev, wf):
        deep = fe.spike_mask(ev)
        if deep.any():
            y, amp = spike_depths(ev[deep], wf[deep], fe.noise_levels, fe.snippets, recording.probe.positions_um)
            rows.append((ev["sample_index"][deep], ev["channel"][deep], y, amp))
        return np.zeros(ev.size, bool)

    snippets_recording(recording, config, progress=progress, select=locate, desc="motion: locate spikes")
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    return tuple(np.concatenate(c) for c in zip(*rows))


def estimate_schedule(recording, config: Config, progress: bool = True):
    """Training's motion: (a :class:`MotionSchedule`, the tracker's reference histogram, a summary for the
    manifest), or (None, None, {}) when motion correction is off for this probe."""
    cfg = config.motion
    probe = recording.probe
    if not motion_enabled(cfg, probe):
        return None, None, {}
    t0 = time.perf_counter()
    samples, channels, depth, amp = locate_spikes(recording, config, progress)
    fs = recording.sampling_rate
    centres = spatial_windows(probe, cfg)
    step = max(1, int(round(cfg.step_s * fs)))
    n_steps = int(np.ceil(recording.n_samples / step))
    step_times = np.arange(n_steps) * step / fs
    disp = _dredge(recording, samples, channels, depth, amp, centres, step_times, cfg)
    # the reference frame: the probe's position over the first tau_s
    first = step_times < max(cfg.tau_s, cfg.step_s)
    disp = disp - disp[first].mean(axis=0, keepdims=True)
    disp = np.clip(disp, -cfg.max_um, cfg.max_um)
    schedule = MotionSchedule(probe, fs, cfg, disp)
    # each spike in the reference frame: minus the displacement at its step, at its channel's depth
    k = np.minimum(samples // step, n_steps - 1)
    ch_disp = np.stack([np.interp(probe.positions_um[:, 1], centres, d) if centres.size > 1
                        else np.full(probe.n_channels, d[0]) for d in disp])  # (n_steps, C)
    reference = reference_histogram(probe, cfg, depth - ch_disp[k, channels], amp, recording.duration_s)
    summary = {"windows_um": centres.tolist(), "step_s": cfg.step_s, "n_spikes": int(samples.size),
               "range_um": [float(disp.min()), float(disp.max())], "seconds": round(time.perf_counter() - t0, 2)}
    log.info("motion: %d spikes, %d window(s), displacement %.1f to %.1f um (%.1f s)", samples.size, centres.size,
             disp.min(), disp.max(), summary["seconds"])
    return schedule, reference, summary


def _dredge(recording, samples, channels, depth, amp, centres, step_times, cfg) -> np.ndarray:
    """DREDge's displacement (n_steps, n_windows) at the windows' centres, positive where the units appear at
    larger y than at the motion's reference."""
    try:
        from spikeinterface.core import NumpyRecording
        from spikeinterface.sortingcomponents.motion import estimate_motion
    except ImportError:
        raise RtsortError("motion correction in training needs SpikeInterface: pip install 'rtsort[interop]' "
                          "(or set [motion] mode = \"off\")") from None
    probe = recording.probe
    if samples.size < 100:
        log.warning("motion: only %d spikes; assuming a still probe", samples.size)
        return np.zeros((step_times.size, centres.size))
    # a recording with no samples: estimate_motion reads only its duration, rate and channel positions
    n = recording.n_samples
    stub = NumpyRecording([np.zeros((1, probe.n_channels), np.float32)], recording.sampling_rate)
    stub = _with_length(stub, n, probe.positions_um)
    peaks = np.zeros(samples.size, dtype=[("sample_index", "i8"), ("channel_index", "i8"), ("amplitude", "f8"),
                                           ("segment_index", "i8")])
    peaks["sample_index"] = samples
    peaks["channel_index"] = channels
    peaks["amplitude"] = -amp  # troughs
    locations = np.zeros(samples.size, dtype=[("x", "f8"), ("y", "f8")])
    locations["x"] = probe.positions_um[channels, 0]
    locations["y"] = depth
    span = float(np.ptp(probe.positions_um[:, 1]))
    rigid = centres.size == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        motion = estimate_motion(stub, peaks, locations, direction="y", rigid=rigid, method="dredge_ap",
                                 win_step_um=max(cfg.window_um / 2, 50.0), win_scale_um=cfg.window_um,
                                 win_margin_um=None if not rigid else -span / 2, progress_bar=False,
                                 bin_um=cfg.bin_um, bin_s=cfg.step_s, max_disp_um=cfg.max_um)
    t = np.clip(step_times + 0.5 * cfg.step_s, 0, recording.duration_s)
    out = np.stack([motion.get_displacement_at_time_and_depth(t, np.full(t.size, c), segment_index=0,
                                                             grid=False) for c in centres], axis=1)
    return np.asarray(out, np.float64)


def _with_length(stub, n_samples: int, positions: np.ndarray):
    """A NumpyRecording stand-in that reports ``n_samples`` (estimate_motion reads no traces)."""
    stub.set_dummy_probe_from_locations(positions)
    seg = stub._recording_segments[0]
    seg.get_num_samples = lambda: int(n_samples)
    return stub
