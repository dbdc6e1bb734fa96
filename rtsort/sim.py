"""Synthetic ground truth: a thin layer over SpikeInterface's generators.

``simulate`` writes a recording in rtsort's raw format (int16, 0.195 uV per
bit, like Intan / Open Ephys) with ``truth.npz`` beside it. The same seed gives
the same bytes. Defaults are harder than SpikeInterface's own (more noise,
smaller templates), so detection and sorting accuracy mean something.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import ConfigError, RtsortError
from .io.recording import BinaryRecording, write_recording

log = logging.getLogger("rtsort.sim")

GAIN_TO_UV = 0.195
NOISE_UV = 10.0


def _require_spikeinterface():
    try:
        import spikeinterface  # noqa: F401
    except ImportError:
        raise RtsortError("simulation needs SpikeInterface: pip install 'rtsort[interop]'") from None


def make_probe(n_channels: int, positions_um=None):
    """A two-column probe, 20 um pitch in both directions (a tetrode-sized block at 4 channels), or the given layout."""
    from probeinterface import Probe, generate_multi_columns_probe

    if positions_um is not None:
        pos = np.asarray(positions_um, dtype=np.float64).reshape(-1, 2)
        if pos.shape[0] != n_channels:
            raise ConfigError(f"simulate: {pos.shape[0]} channel positions for {n_channels} channels")
        probe = Probe(ndim=2)
        probe.set_contacts(pos, shapes="circle", shape_params={"radius": 6})
        probe.set_device_channel_indices(np.arange(n_channels))
        return probe

    n_cols = 2 if n_channels >= 2 else 1
    per_col = [n_channels // n_cols] * n_cols
    per_col[0] += n_channels % n_cols
    probe = generate_multi_columns_probe(
        num_columns=n_cols, num_contact_per_column=per_col, xpitch=20, ypitch=20,
        contact_shapes="circle", contact_shape_params={"radius": 6},
    )
    probe.set_device_channel_indices(np.arange(n_channels))
    return probe


def simulate(out_dir: str | Path, n_channels: int = 32, n_units: int = 12, duration_s: float = 30.0,
             seed: int = 0, drift: bool = False, sampling_rate: float = 30000.0,
             noise_uV: float = NOISE_UV, firing_rates=(2.0, 12.0), progress: bool = True,
             positions_um=None) -> BinaryRecording:
    """Write a ground-truth recording to ``out_dir``.

    Writes ``recording.bin`` + ``recording.json`` (the recording contract) and
    ``truth.npz`` with ``sample_index`` (int64), ``unit`` (int64), plus
    ``templates`` (units, samples, channels; float32 uV), ``template_nbefore``,
    ``unit_peak_channel`` (int32), ``unit_locations_um`` and ``sampling_rate``.
    With ``drift`` the probe moves 20 um up and down (zigzag, 30 s period).
    ``positions_um`` (n_channels, 2) puts the units on your own probe layout
    instead of the default two-column probe.

    Returns the written recording, opened.
    """
    _require_spikeinterface()
    if n_channels < 1 or n_units < 1 or duration_s <= 0 or sampling_rate <= 0:
        raise ConfigError(
            f"simulate needs channels >= 1, units >= 1, duration > 0 and sampling rate > 0 "
            f"(got {n_channels}, {n_units}, {duration_s}, {sampling_rate})"
        )
    from spikeinterface.core.generate import generate_sorting

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = make_probe(n_channels, positions_um)
    sorting = generate_sorting(
        num_units=n_units, sampling_frequency=sampling_rate, durations=[duration_s],
        firing_rates=firing_rates, refractory_period_ms=4.0, seed=seed,
    )
    if drift:
        rec, templates, nbefore, unit_locs = _drifting(probe, sorting, duration_s, sampling_rate, noise_uV, seed)
    else:
        rec, templates, nbefore, unit_locs = _static(probe, sorting, duration_s, sampling_rate, noise_uV, seed)

    written = write_ground_truth(
        out_dir, rec, sorting, probe.contact_positions[:, :2], templates, nbefore, unit_locs, noise_uV,
        meta={"n_channels": n_channels, "n_units": n_units, "duration_s": duration_s, "seed": seed,
              "drift": drift, "sampling_rate": sampling_rate, "noise_uV": noise_uV,
              "firing_rates_hz": list(firing_rates)},
        progress=progress,
    )
    log.info("simulated %d units, %d spikes, %.1f s on %d channels -> %s",
             n_units, sorting.count_total_num_spikes(), duration_s, n_channels, out_dir)
    return written


def write_ground_truth(out_dir, rec, sorting, positions, templates, nbefore, unit_locs, noise_uV, meta: dict,
                       progress: bool = True, extra_truth: dict | None = None) -> BinaryRecording:
    """Write a SpikeInterface recording and its ground truth as ``simulate`` does.

    ``recording.bin`` + ``recording.json`` (int16, ``GAIN_TO_UV``), ``truth.npz``
    (see :func:`simulate`; ``extra_truth`` adds arrays) and ``simulation.json``
    (``meta`` plus ``n_spikes``). Returns the written recording, opened.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sampling_rate = float(rec.get_sampling_frequency())
    n_channels = int(rec.get_num_channels())
    positions = np.asarray(positions, dtype=np.float64)[:, :2]
    n_total = rec.get_num_samples(0)
    block = int(sampling_rate)  # one second at a time

    def blocks():
        it = range(0, n_total, block)
        for s in tqdm(it, desc="simulate", unit="s", disable=not progress, leave=False):
            x = rec.get_traces(start_frame=s, end_frame=min(s + block, n_total), segment_index=0)
            yield np.clip(np.round(x / GAIN_TO_UV), -32768, 32767).astype(np.int16)

    written = write_recording(
        out_dir / "recording.bin", blocks(), sampling_rate, positions, gain_to_uV=GAIN_TO_UV,
        offset_to_uV=0.0, channel_ids=[str(i) for i in range(n_channels)], dtype="int16",
        n_channels=n_channels,
    )
    spikes = sorting.to_spike_vector()
    dist = np.linalg.norm(unit_locs[:, None, :2] - positions[None, :, :], axis=2)
    np.savez(
        out_dir / "truth.npz",
        sample_index=spikes["sample_index"].astype(np.int64),
        unit=spikes["unit_index"].astype(np.int64),
        templates=templates.astype(np.float32),
        template_nbefore=np.int64(nbefore),
        unit_peak_channel=np.abs(templates).max(axis=1).argmax(axis=1).astype(np.int32),
        unit_nearest_channel=dist.argmin(axis=1).astype(np.int32),
        unit_locations_um=unit_locs.astype(np.float64),
        sampling_rate=np.float64(sampling_rate),
        noise_uV=np.float64(noise_uV),
        **(extra_truth or {}),
    )
    (out_dir / "simulation.json").write_text(json.dumps({**meta, "n_spikes": int(spikes.size)}, indent=1) + "\n")
    return written


# Template shapes: SpikeInterface's ranges with smaller amplitudes (alpha), so a
# good share of units sits at SNR 3-8 where detectors differ.
_UNIT_PARAMS = dict(alpha=(60.0, 420.0), spatial_decay=(15.0, 35.0))


def _static(probe, sorting, duration_s, fs, noise_uV, seed):
    from spikeinterface.core.generate import (
        InjectTemplatesRecording,
        generate_templates,
        generate_unit_locations,
    )
    from spikeinterface.generation.noise_tools import NoiseGeneratorRecording

    positions = probe.contact_positions
    ms_before, ms_after = 1.0, 3.0
    unit_locs = generate_unit_locations(
        sorting.get_num_units(), positions, margin_um=10.0, minimum_z=5.0, maximum_z=40.0,
        minimum_distance=15.0, seed=seed,
    )
    templates = generate_templates(positions, unit_locs, fs, ms_before, ms_after, seed=seed,
                                   unit_params=dict(_UNIT_PARAMS))
    nbefore = int(ms_before * fs / 1000.0)
    noise = NoiseGeneratorRecording(
        num_channels=positions.shape[0], sampling_frequency=fs,
        durations=[duration_s], noise_levels=noise_uV, dtype="float32",
        seed=seed, strategy="on_the_fly", noise_block_size=int(fs),
    )
    rec = InjectTemplatesRecording(sorting, templates, nbefore=nbefore, parent_recording=noise)
    return rec, templates, nbefore, unit_locs


def _drifting(probe, sorting, duration_s, fs, noise_uV, seed):
    from spikeinterface.generation import generate_drifting_recording

    n_units = sorting.get_num_units()
    period = min(30.0, max(duration_s, 2.0))
    static, drifting, _, extra = generate_drifting_recording(
        num_units=n_units, duration=duration_s, sampling_frequency=fs, probe=probe, sorting=sorting,
        generate_templates_kwargs=dict(ms_before=1.0, ms_after=3.0, mode="ellipsoid",
                                       unit_params=dict(_UNIT_PARAMS, ellipse_shrink=(0.4, 1),
                                                        ellipse_angle=(0, 2 * np.pi))),
        generate_displacement_vector_kwargs=dict(
            displacement_sampling_frequency=5.0, drift_start_um=[0, 10], drift_stop_um=[0, -10],
            drift_step_um=1, motion_list=[dict(drift_mode="zigzag", non_rigid_gradient=None,
                                              t_start_drift=0.0, t_end_drift=None, period_s=period)],
        ),
        generate_noise_kwargs=dict(noise_levels=(noise_uV, noise_uV), spatial_decay=25.0),
        extra_outputs=True, seed=seed,
    )
    templates = extra["templates"].templates_array
    nbefore = int(extra["templates"].nbefore)
    unit_locs = np.asarray(extra["unit_locations"])
    return drifting, templates, nbefore, unit_locs
