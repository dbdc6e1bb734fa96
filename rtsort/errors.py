"""The project's error hierarchy: one place maps failures to named errors.

Every error a user can cause (bad file, bad argument, bad bundle, lost stream)
is an :class:`RtsortError`; the command line prints its message on one line and
exits non-zero instead of showing a traceback.
"""

from __future__ import annotations


class RtsortError(Exception):
    """Base class of every error rtsort raises on purpose."""


class ConfigError(RtsortError, ValueError):
    """A configuration value or command-line argument is invalid."""


class RecordingError(RtsortError):
    """A recording file (or its sidecar) is missing, malformed or inconsistent."""


class BundleError(RtsortError):
    """A bundle is missing, corrupt, or does not match the data."""


class StreamLostError(RtsortError):
    """A stream source vanished and did not come back in time."""


class StreamFormatError(RtsortError):
    """A stream does not match what the bundle expects (channels, rate, format)."""
