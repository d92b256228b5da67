"""Device choice shared by every model, pipeline and trainer: cuda > mps > cpu unless the user says otherwise."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from mmwb.errors import MmwbDeviceError

DEVICE_ENV = "MMWB_DEVICE"
_KNOWN_TYPES = ("cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """Names of the devices this process can use, best first."""
    names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        names.append("mps")
    names.append("cpu")
    return names


def resolve_device(
    name: str | torch.device | None = None, env: Mapping[str, str] | None = None
) -> torch.device:
    """Return the device to run on.

    Order: an explicit ``name`` (e.g. from ``--device``), then ``$MMWB_DEVICE``, then the best available
    (cuda > mps > cpu). An explicit device that this machine cannot provide is an error, never a silent fallback.
    """
    env = os.environ if env is None else env
    requested = name if name not in (None, "", "auto") else env.get(DEVICE_ENV) or None
    if requested in (None, "auto"):
        return torch.device(available_devices()[0].split(":")[0])
    return _checked(requested, source="--device" if name not in (None, "", "auto") else f"${DEVICE_ENV}")


def _checked(requested: str | torch.device, source: str) -> torch.device:
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as err:
        raise MmwbDeviceError(
            f"{source}: unknown device {str(requested)!r} (use one of {', '.join(_KNOWN_TYPES)})"
        ) from err
    if device.type not in _KNOWN_TYPES:
        raise MmwbDeviceError(
            f"{source}: device type {device.type!r} is not supported (use one of {', '.join(_KNOWN_TYPES)})"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MmwbDeviceError(
                f"{source}: device {str(requested)!r} requested but CUDA is not available on this machine"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MmwbDeviceError(
                f"{source}: device {str(requested)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if device.type == "mps" and not _mps_available():
        raise MmwbDeviceError(f"{source}: device 'mps' requested but MPS is not available on this machine")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock timings measure the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
