"""Facts about the machine a benchmark ran on, and its measured memory bandwidth (the decode roofline)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from mmwb.runtime import median_time


def describe_machine(device: torch.device) -> dict[str, Any]:
    """CPU/GPU model, cores and torch threads: what a reader needs to compare two benchmark tables."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_model(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Sustained bytes/s of a large device-to-device copy (read + write), the ceiling for memory-bound decode."""
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, repeats=repeats, warmup=1)
    return 2 * src.numel() * src.element_size() / seconds
