"""Recordings on disk: raw ``.bin`` + ``.json`` sidecar, and SpikeInterface formats.

The raw format (ARCHITECTURE.md) is little-endian interleaved samples of shape
``(n_samples, n_channels)`` in C order, described by a JSON sidecar. Files are
memory-mapped and read in chunks; nothing loads the whole recording.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import RecordingError
from ..types import Chunk, Probe

log = logging.getLogger("rtsort.io")

#: dtypes a raw recording may hold.
SUPPORTED_DTYPES = ("int16", "uint16", "int32", "float32", "float64")


class Recording:
    """A multi-channel recording read in chunks.

    Subclasses provide :meth:`get_traces`. Samples come back in raw units;
    ``gains_to_uV`` / ``offsets_to_uV`` (per channel) convert to microvolts.
    """

    sampling_rate: float
    n_channels: int
    n_samples: int
    dtype: np.dtype
    gains_to_uV: np.ndarray
    offsets_to_uV: np.ndarray
    probe: Probe
    source: str

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.sampling_rate

    def get_traces(self, start: int, stop: int) -> np.ndarray:  # pragma: no cover - abstract
        """Raw samples ``[start, stop)``, shape (stop - start, n_channels)."""
        raise NotImplementedError

    def iter_chunks(self, chunk_size: int, start: int = 0, stop: int | None = None) -> Iterator[Chunk]:
        """Yield consecutive :class:`Chunk` objects of ``chunk_size`` samples (the last may be shorter)."""
        if chunk_size < 1:
            raise RecordingError(f"chunk size must be >= 1 sample, got {chunk_size}")
        stop = self.n_samples if stop is None else min(int(stop), self.n_samples)
        for s in range(int(start), stop, int(chunk_size)):
            e = min(s + chunk_size, stop)
            yield Chunk(self.get_traces(s, e), first_sample=s)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source!r}, {self.n_channels} ch, "
            f"{self.sampling_rate:g} Hz, {self.duration_s:.2f} s, {np.dtype(self.dtype).name})"
        )


def _sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def read_sidecar(bin_path: str | Path) -> dict:
    """Read and validate the JSON sidecar of a raw recording.

    Raises
    ------
    RecordingError
        On a missing or invalid sidecar, naming the file and the problem.
    """
    bin_path = Path(bin_path)
    side = _sidecar_path(bin_path)
    if not side.exists():
        raise RecordingError(f"{side}: sidecar not found (a raw recording needs X.json beside X.bin)")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordingError(f"{side}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise RecordingError(f"{side}: sidecar must be a JSON object")
    for key in ("sampling_rate", "n_channels", "dtype"):
        if key not in meta:
            raise RecordingError(f"{side}: missing required key {key!r}")
    fs = meta["sampling_rate"]
    if not isinstance(fs, (int, float)) or isinstance(fs, bool) or not math.isfinite(fs) or fs <= 0:
        raise RecordingError(f"{side}: sampling_rate must be a positive number, got {fs!r}")
    n_ch = meta["n_channels"]
    if not isinstance(n_ch, int) or isinstance(n_ch, bool) or n_ch < 1:
        raise RecordingError(f"{side}: n_channels must be a positive integer, got {n_ch!r}")
    if meta["dtype"] not in SUPPORTED_DTYPES:
        raise RecordingError(
            f"{side}: unknown dtype {meta['dtype']!r}; supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    for key in ("gain_to_uV", "offset_to_uV"):
        v = meta.get(key, 1.0 if key == "gain_to_uV" else 0.0)
        values = v if isinstance(v, list) else [v]
        if len(values) not in (1, n_ch) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values
        ):
            raise RecordingError(f"{side}: {key} must be a finite number or a list of {n_ch}, got {v!r}")
    if meta.get("gain_to_uV", 1.0) == 0:
        raise RecordingError(f"{side}: gain_to_uV must not be zero")
    ids = meta.get("channel_ids", [str(i) for i in range(n_ch)])
    if not isinstance(ids, list) or len(ids) != n_ch:
        raise RecordingError(f"{side}: {len(ids) if isinstance(ids, list) else ids!r} channel_ids for {n_ch} channels")
    pos = meta.get("channel_positions_um")
    if pos is None:
        pos = [[0.0, 20.0 * i] for i in range(n_ch)]
    try:
        pos_arr = np.asarray(pos, dtype=np.float64)
    except (TypeError, ValueError):
        raise RecordingError(f"{side}: channel_positions_um must be a list of [x, y] pairs") from None
    if pos_arr.ndim != 2 or pos_arr.shape[1] not in (2, 3):
        raise RecordingError(f"{side}: channel_positions_um must be a list of [x, y] pairs, got shape {pos_arr.shape}")
    if pos_arr.shape[0] != n_ch:
        raise RecordingError(f"{side}: {pos_arr.shape[0]} channel positions for {n_ch} channels")
    if not np.all(np.isfinite(pos_arr)):
        raise RecordingError(f"{side}: channel_positions_um contains NaN or infinite values")
    meta["channel_ids"] = [str(i) for i in ids]
    meta["channel_positions_um"] = pos_arr[:, :2].tolist()
    return meta


class BinaryRecording(Recording):
    """A raw ``.bin`` + ``.json`` recording, memory-mapped.

    Parameters
    ----------
    path : str or Path
        The ``.bin`` file (or its ``.json`` sidecar).
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.suffix == ".json":
            path = path.with_suffix(".bin")
        if not path.exists():
            raise RecordingError(f"{path}: recording not found")
        meta = read_sidecar(path)
        self.source = str(path)
        self.meta = meta
        self.sampling_rate = float(meta["sampling_rate"])
        self.n_channels = int(meta["n_channels"])
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        frame = self.n_channels * self.dtype.itemsize
        size = path.stat().st_size
        if size % frame:
            raise RecordingError(
                f"{path}: size {size} bytes is not a multiple of n_channels * itemsize = "
                f"{self.n_channels} * {self.dtype.itemsize} (truncated file or wrong n_channels/dtype)"
            )
        self.n_samples = size // frame
        self.gains_to_uV = np.broadcast_to(
            np.asarray(meta.get("gain_to_uV", 1.0), dtype=np.float64), (self.n_channels,)
        ).copy()
        self.offsets_to_uV = np.broadcast_to(
            np.asarray(meta.get("offset_to_uV", 0.0), dtype=np.float64), (self.n_channels,)
        ).copy()
        self.probe = Probe(np.asarray(meta["channel_positions_um"]), tuple(meta["channel_ids"]))
        if self.n_samples:
            self._data = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.n_samples, self.n_channels))
        else:
            self._data = np.zeros((0, self.n_channels), dtype=self.dtype)

    def get_traces(self, start: int, stop: int) -> np.ndarray:
        start = max(0, int(start))
        stop = min(int(stop), self.n_samples)
        return np.asarray(self._data[start:stop])


def write_recording(
    path: str | Path,
    traces: np.ndarray | Iterable[np.ndarray],
    sampling_rate: float,
    positions_um: np.ndarray | None = None,
    *,
    gain_to_uV: float | list = 1.0,
    offset_to_uV: float | list = 0.0,
    channel_ids: list | None = None,
    dtype: str | None = None,
    n_channels: int | None = None,
) -> BinaryRecording:
    """Write a raw recording and its sidecar; return it opened for reading.

    Parameters
    ----------
    path : str or Path
        Destination ``.bin`` path (the ``.json`` sidecar is written beside it).
    traces : ndarray of shape (n_samples, n_channels), or an iterable of such blocks
        Samples in the file's dtype (blocks are written as they come, so a long
        recording never needs to fit in memory).
    """
    path = Path(path)
    if path.suffix != ".bin":
        raise RecordingError(f"{path}: a raw recording must end in .bin")
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = [traces] if isinstance(traces, np.ndarray) else traces
    written_dtype = np.dtype(dtype) if dtype is not None else None
    with open(path, "wb") as fh:
        for block in blocks:
            block = np.asarray(block)
            if block.ndim != 2:
                raise RecordingError(f"traces must be 2-D (n_samples, n_channels), got shape {block.shape}")
            if written_dtype is None:
                written_dtype = block.dtype
            if n_channels is None:
                n_channels = block.shape[1]
            if block.shape[1] != n_channels:
                raise RecordingError(f"block has {block.shape[1]} channels, expected {n_channels}")
            fh.write(np.ascontiguousarray(block, dtype=written_dtype.newbyteorder("<")).tobytes())
    if written_dtype is None or n_channels is None:
        raise RecordingError("no samples to write and no dtype / n_channels given")
    if written_dtype.name not in SUPPORTED_DTYPES:
        raise RecordingError(f"unsupported dtype {written_dtype.name}; supported: {', '.join(SUPPORTED_DTYPES)}")
    if positions_um is None:
        positions_um = np.column_stack([np.zeros(n_channels), 20.0 * np.arange(n_channels)])
    meta = {
        "sampling_rate": float(sampling_rate),
        "n_channels": int(n_channels),
        "dtype": written_dtype.name,
        "gain_to_uV": gain_to_uV,
        "offset_to_uV": offset_to_uV,
        "channel_ids": [str(c) for c in (channel_ids if channel_ids is not None else range(n_channels))],
        "channel_positions_um": np.asarray(positions_um, dtype=float)[:, :2].tolist(),
    }
    _sidecar_path(path).write_text(json.dumps(meta, indent=1) + "\n")
    return BinaryRecording(path)


class SpikeInterfaceRecording(Recording):
    """Any recording SpikeInterface reads, adapted to rtsort's chunked reader."""

    def __init__(self, si_recording, source: str):
        if si_recording.get_num_segments() != 1:
            raise RecordingError(
                f"{source}: {si_recording.get_num_segments()} segments; rtsort reads single-segment recordings "
                "(select one with SpikeInterface's select_segments)"
            )
        self._rec = si_recording
        self.source = source
        self.sampling_rate = float(si_recording.get_sampling_frequency())
        self.n_channels = int(si_recording.get_num_channels())
        self.n_samples = int(si_recording.get_num_samples(0))
        self.dtype = np.dtype(si_recording.get_dtype())
        gains = si_recording.get_channel_gains()
        offsets = si_recording.get_channel_offsets()
        self.gains_to_uV = np.ones(self.n_channels) if gains is None else np.asarray(gains, dtype=np.float64)
        self.offsets_to_uV = np.zeros(self.n_channels) if offsets is None else np.asarray(offsets, dtype=np.float64)
        try:
            positions = si_recording.get_channel_locations()
        except Exception:  # no probe attached: a linear layout, 20 um pitch
            positions = np.column_stack([np.zeros(self.n_channels), 20.0 * np.arange(self.n_channels)])
            log.warning("%s: the file gives no channel positions; assuming a linear probe, 20 um apart. If that is "
                        "not the probe, snippets and spike positions are wrong: attach its geometry with "
                        "probeinterface and save a SpikeInterface folder, or write X.bin + X.json with "
                        "channel_positions_um", source)
        self.probe = Probe(np.asarray(positions, dtype=float), tuple(str(c) for c in si_recording.channel_ids))

    def get_traces(self, start: int, stop: int) -> np.ndarray:
        return self._rec.get_traces(start_frame=int(start), end_frame=int(stop), segment_index=0)


def _read_with_spikeinterface(path: Path):
    try:
        import spikeinterface.core as sic
        import spikeinterface.extractors as se
    except ImportError:
        raise RecordingError(
            f"{path}: not a raw .bin recording, and SpikeInterface is not installed to read other formats "
            "(pip install 'rtsort[interop]')"
        ) from None
    name = path.name.lower()
    if path.is_dir():
        if (path / "si_folder.json").exists() or (path / "binary.json").exists():
            return sic.load(path)
        if any(path.glob("*.ap.bin")) or any(path.glob("*.lf.bin")) or any(path.glob("*.nidq.bin")):
            return se.read_spikeglx(path, stream_id=_first_stream(se.get_neo_streams("spikeglx", path)))
        if any(path.rglob("structure.oebin")) or any(path.rglob("settings.xml")):
            return se.read_openephys(path)
        raise RecordingError(f"{path}: folder is not a SpikeInterface, SpikeGLX or Open Ephys recording")
    if name.endswith(".bin") and path.with_suffix(".meta").exists():  # one SpikeGLX stream: X.imec0.ap.bin
        stream = ".".join(path.stem.split(".")[1:])
        if not stream:
            raise RecordingError(f"{path}: a SpikeGLX file is named RUN_gN_tN.imecN.ap.bin (or .lf, .nidq)")
        return se.read_spikeglx(path.parent, stream_id=stream)
    if name.endswith(".nwb"):
        return se.read_nwb_recording(path)
    if name.endswith((".rhd", ".rhs")):
        return se.read_intan(path, stream_id="0")
    if name.endswith(".raw.h5"):
        return se.read_maxwell(path)
    raise RecordingError(
        f"{path}: unknown recording format (expected X.bin + X.json, a SpikeInterface folder, "
        "SpikeGLX (its folder or an X.imec0.ap.bin with its .meta), Open Ephys, NWB, Intan or Maxwell)"
    )


def _first_stream(streams):
    names, ids = streams
    for stream_id in ids:
        if stream_id.endswith(".ap"):
            return stream_id
    return ids[0]


def open_recording(path: str | Path) -> Recording:
    """Open a recording: a raw ``.bin``/``.json`` pair, or anything SpikeInterface reads.

    Raises
    ------
    RecordingError
        When the path is missing, malformed, or in no format rtsort can read.
    """
    path = Path(path)
    if not path.exists():
        raise RecordingError(f"{path}: recording not found")
    if path.suffix in (".bin", ".json") and _sidecar_path(path).exists():
        return BinaryRecording(path)
    if path.suffix == ".bin" and not path.with_suffix(".meta").exists():
        read_sidecar(path)  # raises the sidecar's own error
    try:
        si_rec = _read_with_spikeinterface(path)
    except RecordingError:
        raise
    except Exception as exc:  # SpikeInterface / neo raise many kinds of errors
        raise RecordingError(f"{path}: SpikeInterface could not read it ({type(exc).__name__}: {exc})") from None
    return SpikeInterfaceRecording(si_rec, str(path))
