"""Readers and writers: recordings, spike files."""

from .recording import (
    BinaryRecording,
    Recording,
    open_recording,
    read_sidecar,
    write_recording,
)
from .spikes import load_spikes, save_spikes

__all__ = ["BinaryRecording", "Recording", "open_recording", "read_sidecar", "write_recording", "load_spikes", "save_spikes"]
