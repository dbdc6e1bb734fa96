"""Readers and writers: recordings, spike files."""

from .recording import (
    BinaryRecording,
    Recording,
    open_recording,
    read_sidecar,
    write_recording,
)

__all__ = ["BinaryRecording", "Recording", "open_recording", "read_sidecar", "write_recording"]
