"""Facts about the machine a benchmark ran on, and the decode roofline: its measured memory bandwidth over the bytes a
decode step reads."""

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


def active_decode_bytes(ours: Any, context: int) -> int:
    """Bytes one batch-1 decode step must read: every weight except the embedding table and unchosen experts,
    top-k experts per MoE layer, and the KV cache of ``context`` tokens. Quantized layers count what their
    kernel reads (``QuantizedLinear.kernel_bytes``), except an MLA layer's kv_b: its absorbed decode reads the
    dequantized copy, in the layer's dtype."""
    from mmwb.models.decoder.mla import MultiHeadLatentAttention
    from mmwb.models.decoder.moe import Experts
    from mmwb.models.quantize import QuantizedExperts, QuantizedLinear

    total = 0
    for name, param in ours.named_parameters():
        if "embed_tokens" not in name:
            total += param.numel() * param.element_size()
    top_k = ours.config.num_experts_per_tok
    for module in ours.modules():
        if isinstance(module, Experts):
            per_expert = sum(p[0].numel() * p.element_size() for p in (module.gate_up_proj, module.down_proj))
            total -= per_expert * (module.gate_up_proj.shape[0] - top_k)
        elif isinstance(module, QuantizedLinear):
            total += module.kernel_bytes()
        elif isinstance(module, QuantizedExperts):  # its layers were all counted above: keep top-k of them
            per_expert = module.gate_up[0].kernel_bytes() + module.down[0].kernel_bytes()
            total -= per_expert * (module.num_experts - top_k)
        elif isinstance(module, MultiHeadLatentAttention) and isinstance(module.kv_b_proj, QuantizedLinear):
            kv_b, dtype_bytes = module.kv_b_proj, module.kv_a_layernorm.weight.element_size()
            total += kv_b.out_features * kv_b.in_features * dtype_bytes - kv_b.kernel_bytes()
    return total + ours.cache_bytes_per_token() * context
