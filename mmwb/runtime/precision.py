"""One precision policy (fp32, bf16, fp16) for inference and mixed-precision training on any device."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from mmwb.errors import MmwbDeviceError

PrecisionName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def supported_precisions(device: torch.device) -> list[str]:
    """Precisions this device runs natively. fp16 on CPU is left out: its kernels are emulated and slow."""
    if device.type == "cuda":
        names = ["fp32", "fp16"]
        if torch.cuda.is_bf16_supported():
            names.append("bf16")
        return names
    if device.type == "mps":
        return ["fp32", "fp16", "bf16"] if _mps_has_bf16() else ["fp32", "fp16"]
    return ["fp32", "bf16"]


def _mps_has_bf16() -> bool:
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class Precision:
    """How tensors are stored and computed on one device.

    ``param_dtype`` is the dtype weights are cast to for inference; training keeps fp32 master weights and runs
    its forward pass under ``autocast()`` instead.
    """

    name: PrecisionName
    device: torch.device

    @property
    def param_dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def is_mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for mixed-precision forward passes; a no-op context for fp32."""
        if not self.is_mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.param_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler only where it is needed: fp16 on CUDA (bf16 has fp32's exponent range)."""
        if self.name == "fp16" and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None


def resolve_precision(name: str | torch.dtype | None, device: torch.device) -> Precision:
    """Validate ``name`` for ``device``; ``None`` means fp32. Unsupported combinations are refused with a reason."""
    key = _normalise(name)
    supported = supported_precisions(device)
    if key not in supported:
        reason = {
            ("cpu", "fp16"): "CPUs have no fast fp16 kernels; use bf16 or fp32",
            (
                "cuda",
                "bf16",
            ): "this GPU has no bf16 support (needs compute capability 8.0+); use fp16 or fp32",
            ("mps", "bf16"): "this macOS/MPS build has no bf16 support; use fp16 or fp32",
        }.get((device.type, key), f"supported here: {', '.join(supported)}")
        raise MmwbDeviceError(f"--dtype {key} is not supported on {device.type}: {reason}")
    return Precision(key, device)  # type: ignore[arg-type]


def _normalise(name: str | torch.dtype | None) -> str:
    if name is None:
        return "fp32"
    if isinstance(name, torch.dtype):
        for key, dtype in DTYPES.items():
            if dtype == name:
                return key
        raise MmwbDeviceError(f"--dtype {name} is not one of {', '.join(DTYPES)}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise MmwbDeviceError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return key
