"""Readers and writers: recordings, spike files, exports (SpikeInterface, NWB; imported only when called)."""

from .recording import (
    BinaryRecording,
    Recording,
    open_recording,
    read_sidecar,
    write_recording,
)
from .export import to_spikeinterface
from .spikes import load_spikes, save_spikes

__all__ = ["BinaryRecording", "Recording", "open_recording", "read_sidecar", "write_recording", "load_spikes", "save_spikes",
           "to_spikeinterface"]
