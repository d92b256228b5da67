"""``mmwb env``: what this machine offers mmwb, for bug reports and for choosing --device/--dtype."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from typing import Any

HELP = "Print package versions, available devices with their supported dtypes, and thread counts."
PACKAGES = (
    "mmwb", "torch", "torchvision", "transformers", "diffusers", "open-clip-torch", "accelerate", "peft",
    "tokenizers", "safetensors", "numpy", "pillow", "scipy", "opencv-python-headless",
)  # fmt: skip
ENV_VARS = ("MMWB_DEVICE", "HF_HUB_OFFLINE", "HF_HOME", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``env`` takes only the common flags."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = collect()
    if not args.json:
        print(format_report(info))
    return info


def collect() -> dict[str, Any]:
    """Versions, devices, dtypes and threads as plain data (the ``--json`` document)."""
    import torch

    from mmwb.runtime import available_devices, resolve_device, supported_precisions

    devices = [_describe_device(torch.device(name), supported_precisions) for name in available_devices()]
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "default_device": str(resolve_device(None)),
        "devices": devices,
        "threads": {
            "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
        },
        "environment": {name: os.environ.get(name) for name in ENV_VARS},
    }


def _describe_device(device: Any, supported_precisions: Any) -> dict[str, Any]:
    import torch

    entry: dict[str, Any] = {"name": str(device), "dtypes": supported_precisions(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        entry.update(model=props.name, memory_gb=round(props.total_memory / 2**30, 1))
    elif device.type == "cpu":
        entry["model"] = platform.processor() or platform.machine()
    return entry


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def format_report(info: dict[str, Any]) -> str:
    lines = [f"python      {info['python']} on {info['platform']}"]
    lines += [f"{name:<23} {version or 'not installed'}" for name, version in info["packages"].items()]
    lines.append(f"default device  {info['default_device']}")
    for dev in info["devices"]:
        details = [str(dev[key]) for key in ("model", "memory_gb") if dev.get(key)]
        extra = f" ({', '.join(details)}{' GB' if 'memory_gb' in dev else ''})" if details else ""
        lines.append(f"  {dev['name']}{extra}: dtypes {', '.join(dev['dtypes'])}")
    threads = info["threads"]
    lines.append(
        f"threads     {threads['usable_cpus']} usable CPUs of {threads['cpu_count']}; torch intra-op "
        f"{threads['torch_intra_op']}, inter-op {threads['torch_inter_op']}"
    )
    lines += [f"${name}={value}" for name, value in info["environment"].items() if value is not None]
    return "\n".join(lines)
