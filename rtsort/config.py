"""Typed, closed configuration: frozen dataclasses with defaults in one place.

Unknown keys are an error, and every bad value is reported with the name of the
field, the value given and what is allowed. Configs read from and write to TOML
(one table per stage) and serialise to plain dicts for the bundle manifest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_ints(section: str, obj, names: tuple, lo: int, hi: int | None = None) -> None:
    """Each named field of ``obj`` an int (not a bool) in [lo, hi] (no upper bound without ``hi``)."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ConfigError(f"{section}.{name} must be an integer {bound}, got {v!r}")


def _check_fractions(section: str, obj, names: tuple) -> None:
    """Each named field of ``obj`` a float in [0, 1]."""
    for name in names:
        v = getattr(obj, name)
        if not (isinstance(v, float) and 0 <= v <= 1):
            raise ConfigError(f"{section}.{name} must be a number in [0, 1], got {v!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True)
class PreprocessConfig:
    """Causal band-pass filter and common reference.

    The filter is a Butterworth band-pass in second-order sections run forward
    only (causal), its state carried across chunks.
    """

    freq_min: float = 300.0
    freq_max: float = 6000.0
    filter_order: int = 3
    # "auto" (the median where a spike covers less than half of the probe's channels, else none), "median",
    # "average" or "none"
    reference: str = "auto"

    def __post_init__(self):
        _check_positive("preprocess.freq_min", self.freq_min)
        _check_positive("preprocess.freq_max", self.freq_max)
        if self.freq_min >= self.freq_max:
            raise ConfigError(
                f"preprocess.freq_min ({self.freq_min}) must be below preprocess.freq_max ({self.freq_max})"
            )
        if not isinstance(self.filter_order, int) or not 1 <= self.filter_order <= 8:
            raise ConfigError(f"preprocess.filter_order must be an integer in 1..8, got {self.filter_order!r}")
        _check_choice("preprocess.reference", self.reference, ("auto", "median", "average", "none"))


@dataclass(frozen=True)
class DetectConfig:
    """The gradient detector.

    A spike is a sharp slope of the filtered voltage: the detector thresholds the
    ``slope_ms`` difference ``x[t] - x[t - slope]`` in units of its own noise
    (MAD / 0.6745 per channel), keeps only the steepest slope within
    ``radius_um`` and ``sweep_ms``, aligns the event to the voltage trough within
    ``trough_search_ms`` after the slope, requires that trough to be
    ``amp_threshold`` voltage-noise units deep, and applies a per-channel refractory
    period. Defaults were chosen by measurement (tools/detection_quality.py).

    Events from ``candidate_threshold`` up to ``amp_threshold`` deep are
    candidates: training does not learn from them, and the runtime emits one
    only when a unit's template claims it (0: no candidates). Troughs at least
    ``trough_threshold`` deep that no slope event explains are candidates too
    (``rtsort.detect``, step 5; 0: none).
    """

    threshold: float = 2.5
    amp_threshold: float = 4.5
    candidate_threshold: float = 2.5
    trough_threshold: float = 3.0
    slope_ms: float = 0.2
    polarity: str = "neg"  # "neg", "pos" or "both"
    radius_um: float = 50.0
    sweep_ms: float = 0.4
    trough_search_ms: float = 0.4
    refractory_ms: float = 1.0
    noise_window_s: float = 10.0

    def __post_init__(self):
        _check_positive("detect.threshold", self.threshold)
        _check_positive("detect.amp_threshold", self.amp_threshold, allow_zero=True)
        _check_positive("detect.candidate_threshold", self.candidate_threshold, allow_zero=True)
        _check_positive("detect.trough_threshold", self.trough_threshold, allow_zero=True)
        _check_positive("detect.slope_ms", self.slope_ms)
        _check_choice("detect.polarity", self.polarity, ("neg", "pos", "both"))
        _check_positive("detect.radius_um", self.radius_um, allow_zero=True)
        _check_positive("detect.sweep_ms", self.sweep_ms, allow_zero=True)
        _check_positive("detect.trough_search_ms", self.trough_search_ms, allow_zero=True)
        _check_positive("detect.refractory_ms", self.refractory_ms, allow_zero=True)
        _check_positive("detect.noise_window_s", self.noise_window_s)


@dataclass(frozen=True)
class SnippetConfig:
    """Waveform snippets cut around each trough over the nearest channels."""

    ms_before: float = 0.6
    ms_after: float = 0.7  # the post-trough wait: docs/configuration.md, [snippets]
    n_channels: int = 8

    def __post_init__(self):
        _check_positive("snippets.ms_before", self.ms_before, allow_zero=True)
        _check_positive("snippets.ms_after", self.ms_after)
        if not isinstance(self.n_channels, int) or self.n_channels < 1:
            raise ConfigError(f"snippets.n_channels must be an integer >= 1, got {self.n_channels!r}")


@dataclass(frozen=True)
class TrainConfig:
    """The feature model (training only; the runtime reads the exported encoder).

    ``features = "transformer"``: a Transformer autoencoder with one token per
    snippet channel (its samples plus its position relative to the peak
    channel), trained on reconstruction of the clean snippet from an augmented
    one plus a contrastive term between two augmented views. ``"pca"``: principal
    components of the noise-normalised snippets (the baseline it must beat).
    """

    features: str = "transformer"  # "transformer" or "pca"
    latent_dim: int = 24
    d_model: int = 32
    n_layers: int = 1
    n_heads: int = 4
    epochs: int = 25
    batch_size: int = 256
    max_snippets: int = 12000
    learning_rate: float = 3e-3
    patience: int = 4
    contrastive_weight: float = 0.5
    # the latent adds a fixed projection on the training snippets' first principal components to the Transformer's
    # output, which learns what it misses (without: C 36 / 34 / 33 units over seeds 0 / 1 / 2, with: 35 / 36 / 36)
    linear_path: bool = True
    threads: int = 2
    # the templates are re-estimated this many times from the bundle's own sort of the training recording (its
    # spikes at every size, candidates and matches included, not only those deep enough to cluster; 0: the
    # clusters' means)
    template_rounds: int = 1

    def __post_init__(self):
        _check_choice("train.features", self.features, ("transformer", "pca"))
        _check_ints("train", self, ("latent_dim", "d_model", "n_layers", "n_heads", "epochs", "batch_size",
                                    "max_snippets", "patience", "threads"), 1)
        _check_ints("train", self, ("template_rounds",), 0, 8)
        if self.d_model % self.n_heads:
            raise ConfigError(f"train.d_model ({self.d_model}) must be a multiple of train.n_heads ({self.n_heads})")
        _check_positive("train.learning_rate", self.learning_rate)
        _check_positive("train.contrastive_weight", self.contrastive_weight, allow_zero=True)


@dataclass(frozen=True)
class ClusterConfig:
    """Clustering of features into units, merging, and the runtime's rejection radii."""

    min_cluster_size: int = 20
    min_samples: int = 10
    selection: str = "eom"  # HDBSCAN's cluster_selection_method: "eom" (excess of mass) or "leaf" (finest)
    split: bool = True  # split each group where its spikes on the group's own channels form several dense groups
    position_scale_um: float = 10.0  # 1 feature unit = this many um of spike position
    merge_threshold: float = 0.4  # relative template distance below which two clusters are one unit
    max_spikes: int = 40000  # clustering subsample; every spike is then labelled as the runtime labels it
    reject_quantile: float = 0.99
    reject_factor: float = 1.5
    # drift: two units are one neuron seen at two depths when they sit within drift_merge_um, their peak-channel
    # waveforms agree (cosine >= drift_merge_similarity) and they take turns (correlation of their spike counts
    # over time <= -drift_merge_anticorrelation); drift_merge_um = 0 turns this off
    drift_merge_um: float = 40.0
    drift_merge_similarity: float = 0.9
    drift_merge_anticorrelation: float = 0.7
    drift_bin_s: float = 2.0
    # a unit is a bigger unit's tail (dropped) when more than tail_fraction of its spikes lie 0.2 to
    # tail_max_lag_ms from one of that unit's spikes (0: keep every unit)
    tail_fraction: float = 0.5
    tail_max_lag_ms: float = 2.0

    def __post_init__(self):
        _check_positive("cluster.drift_merge_um", self.drift_merge_um, allow_zero=True)
        _check_positive("cluster.tail_max_lag_ms", self.tail_max_lag_ms)
        _check_positive("cluster.drift_bin_s", self.drift_bin_s)
        if self.selection not in ("eom", "leaf"):
            raise ConfigError(f"cluster.selection must be 'eom' or 'leaf', got {self.selection!r}")
        _check_fractions("cluster", self, ("drift_merge_similarity", "drift_merge_anticorrelation", "tail_fraction"))
        _check_ints("cluster", self, ("min_cluster_size", "min_samples", "max_spikes"), 2)
        _check_positive("cluster.position_scale_um", self.position_scale_um)
        _check_positive("cluster.merge_threshold", self.merge_threshold, allow_zero=True)
        if not (isinstance(self.reject_quantile, float) and 0 < self.reject_quantile <= 1):
            raise ConfigError(f"cluster.reject_quantile must be in (0, 1], got {self.reject_quantile!r}")
        _check_positive("cluster.reject_factor", self.reject_factor)


@dataclass(frozen=True)
class AssignConfig:
    """Runtime labelling. ``track_rate`` > 0 lets centroids follow slow drift.

    A spike within ``track_within`` x its centroid's rejection radius moves that
    centroid by ``track_rate`` x (spike - centroid), spike by spike in stream
    order (so the labels stay the same for any chunking). 0 keeps the centroids
    fixed, as trained.

    The nearest centroids short-list a spike's units; the one whose template
    explains the snippet best takes it (``rtsort.assign``).
    """

    track_rate: float = 0.0
    track_within: float = 0.5
    # the units of the template_candidates nearest centroids compete by template fit (0: nearest centroid alone);
    # the best fit must reach template_min_snr as a matched filter (<x, T> / |T|, noise units) and need the
    # template scaled by at least template_min_scale, else the spike is unassigned (a candidate: dropped)
    template_candidates: int = 5
    template_min_snr: float = 10.0
    template_min_scale: float = 0.6
    template_max_shift: int = 1
    # a candidate's best fit must also leave at most this mean squared residual per sample (noise units; noise
    # alone: 1), plus half the fit's energy, so the tail of another unit's spike is not claimed by a small
    # template; 0: no limit (the search takes back from the residual what this rejects when its template fits)
    candidate_max_residual: float = 1.0
    # ... and the footprint: the residual of a candidate's fit, projected channel by channel onto its template's
    # time course, may hold at most this much squared per channel (noise units; noise alone: 1) plus
    # FOOTPRINT_OF_FIT of the fit's energy, so a neighbour's spike whose channels differ is not claimed (0: no limit)
    candidate_max_footprint: float = 3.0
    # a template's scale a costs amplitude_prior x (a - 1)^2 x |T|^2 in the fit (noise units): a spike is its own
    # unit's template at about its usual size, so a neighbour's template stretched to fit loses (0: scale free)
    amplitude_prior: float = 1.0
    # > 0: an event that an earlier labelled spike's template explains (the event minus the template's prediction
    # there is too shallow to be detected) is that spike's late phase, dropped as a tail; 0: never
    # (rtsort.assign.LatePhase; the value itself sets nothing else, so bundles that set it read the same)
    late_phase_residual: float = 3.0
    # subtract every labelled spike's template and look again for spikes it hid (collisions; rtsort.peel)
    peel: bool = True
    # with peel: the bundle's templates reach this far after the trough (ms; training; at least snippets.ms_after),
    # so what peeling subtracts holds a spike's late phase too, not only the snippet's span
    subtract_ms_after: float = 2.2
    # with peel: also run every unit's template over the residual as a matched filter and take the spikes it finds
    # that its template explains (weak spikes the detector's channel-by-channel thresholds missed; rtsort.peel)
    search: bool = True
    # the template fit's posterior over units (each event's confidence, rtsort.assign) divides the log-likelihoods
    # by this: filtered noise is correlated over samples and channels and a unit's spikes vary about its template,
    # so the independent-noise likelihood is over-confident (the least log loss on the tune half,
    # tools/calibration.py; docs/configuration.md)
    confidence_temperature: float = 16.0

    def __post_init__(self):
        _check_fractions("assign", self, ("track_rate", "track_within"))
        _check_positive("assign.confidence_temperature", self.confidence_temperature)
        _check_ints("assign", self, ("template_candidates", "template_max_shift"), 0, 64)
        _check_positive("assign.template_min_snr", self.template_min_snr, allow_zero=True)
        _check_positive("assign.template_min_scale", self.template_min_scale, allow_zero=True)
        _check_positive("assign.candidate_max_residual", self.candidate_max_residual, allow_zero=True)
        _check_positive("assign.candidate_max_footprint", self.candidate_max_footprint, allow_zero=True)
        _check_positive("assign.amplitude_prior", self.amplitude_prior, allow_zero=True)
        _check_positive("assign.late_phase_residual", self.late_phase_residual, allow_zero=True)
        _check_positive("assign.subtract_ms_after", self.subtract_ms_after, allow_zero=True)


@dataclass(frozen=True)
class MotionConfig:
    """Motion correction (``rtsort.motion``): the front end resamples each chunk from where the units are now to
    where they were when the bundle was trained.

    ``mode``: "auto" (on when the probe spans at least ``auto_min_span_um`` along y), "rigid" (one displacement
    for the whole probe), "nonrigid" (one per ``window_um`` of the probe, interpolated between) or "off".
    Training estimates the displacement over the whole recording with SpikeInterface's DREDge; the runtime tracks
    it causally, every ``step_s``, from the spikes of the last ``tau_s`` or so (an exponential memory).
    """

    mode: str = "auto"
    auto_min_span_um: float = 200.0
    step_s: float = 0.5
    tau_s: float = 1.0
    max_um: float = 60.0
    bin_um: float = 2.0
    window_um: float = 400.0

    def __post_init__(self):
        if self.mode not in ("auto", "rigid", "nonrigid", "off"):
            raise ConfigError(f"motion.mode must be 'auto', 'rigid', 'nonrigid' or 'off', got {self.mode!r}")
        _check_positive("motion.auto_min_span_um", self.auto_min_span_um, allow_zero=True)
        for key in ("tau_s", "max_um", "bin_um", "window_um"):
            _check_positive(f"motion.{key}", getattr(self, key))
        if not self.step_s >= 0.1:
            raise ConfigError(f"motion.step_s must be at least 0.1 s, got {self.step_s!r}")


@dataclass(frozen=True)
class Config:
    """Every stage's configuration."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    snippets: SnippetConfig = field(default_factory=SnippetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        """Build a config from nested dicts; unknown tables or keys are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"configuration must be a table, got {type(data).__name__}")
        sections = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"unknown configuration table(s) {unknown}; allowed: {sorted(sections)}")
        kwargs = {}
        for f in fields(cls):
            if f.name in data:
                kwargs[f.name] = _section_from_dict(_SECTION_TYPES[f.name], f.name, data[f.name])
        return cls(**kwargs)


_SECTION_TYPES = {"preprocess": PreprocessConfig, "detect": DetectConfig, "snippets": SnippetConfig,
                  "train": TrainConfig, "cluster": ClusterConfig, "assign": AssignConfig,
                  "motion": MotionConfig}


def _section_from_dict(cls, name: str, data: Any):
    if not isinstance(data, dict):
        raise ConfigError(f"[{name}] must be a table, got {data!r}")
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{name}]; allowed: {sorted(allowed)}")
    kwargs = {}
    for key, value in data.items():
        default = getattr(cls(), key)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(default) is not type(value):
            raise ConfigError(
                f"{name}.{key} must be {type(default).__name__}, got {type(value).__name__} {value!r}"
            )
        kwargs[key] = value
    return cls(**kwargs)


def load_config(path: str | Path | None) -> Config:
    """Read a TOML configuration file (``None`` gives the defaults)."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    return Config.from_dict(data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")


def dump_config(config: Config) -> str:
    """Write a configuration as TOML text (one table per stage)."""
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)
