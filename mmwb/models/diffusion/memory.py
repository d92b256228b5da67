"""Placing a diffusers pipeline on a device with the memory savers the user asked for.

Every saver trades speed for memory, so all are off by default; each maps onto one diffusers/accelerate switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from mmwb.errors import MmwbDeviceError


@dataclass(frozen=True)
class MemorySavers:
    attention_slicing: bool = False  # attention computed in slices: less peak memory, a little slower
    vae_slicing: bool = False  # decode a batch one image at a time
    vae_tiling: bool = False  # decode large images in overlapping tiles
    cpu_offload: bool = False  # accelerate keeps each model on the CPU until it runs (accelerators only)
    channels_last: bool = False  # NHWC convolutions for UNet and ControlNets, often faster on GPUs


def place_pipeline(pipe: DiffusionPipeline, device: torch.device, savers: MemorySavers) -> DiffusionPipeline:
    """Move ``pipe`` to ``device`` (or hand it to accelerate's offloading) and switch on ``savers``."""
    if savers.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.controlnet.to(memory_format=torch.channels_last)
    if savers.attention_slicing:
        pipe.enable_attention_slicing()
    if savers.vae_slicing:
        pipe.vae.enable_slicing()
    if savers.vae_tiling:
        pipe.vae.enable_tiling()
    if savers.cpu_offload:
        if device.type == "cpu":
            raise MmwbDeviceError(
                "--cpu-offload needs an accelerator (cuda or mps); on the CPU it saves nothing"
            )
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe
