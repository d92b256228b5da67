"""Exceptions that the CLI turns into a one-line message and exit code 2.

Anything raised as an ``MmwbError`` is the user's input being wrong (a file, a flag, a config key, a checkpoint),
not a bug in mmwb, so the CLI prints it without a traceback.
"""

from __future__ import annotations


class MmwbError(Exception):
    """Base class for errors caused by what the user gave mmwb."""


class MmwbInputError(MmwbError, ValueError):
    """A file, image, prompt or argument that mmwb cannot use; the message names the culprit."""


class MmwbConfigError(MmwbError, ValueError):
    """A config file or override with an unknown key or a value of the wrong type."""


class MmwbCheckpointError(MmwbError, ValueError):
    """A checkpoint with missing, unexpected or mis-shaped tensors, or an unknown format."""


class MmwbDeviceError(MmwbError, RuntimeError):
    """A device or dtype that this machine or build cannot provide."""
