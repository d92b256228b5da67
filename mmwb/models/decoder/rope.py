"""Rotary position embedding with the context-extension schemes the supported checkpoints use.

Frequencies are computed once per model; cos/sin for the positions of a forward pass are computed once and shared
by all layers. Rotation uses the half-split layout (x[:d/2], x[d/2:]); DeepSeek's interleaved layout is turned into
it at import time by permuting projection rows, so the hot path never shuffles.
"""

from __future__ import annotations

import math

import torch

from mmwb.models.decoder.config import DecoderConfig, yarn_mscale
from mmwb.models.decoder.fp32_buffers import Fp32Buffers


def rope_frequencies(cfg: DecoderConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the cos/sin scale for cfg's rope type."""
    dim, base = cfg.rope_dim, cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if (
        cfg.rope_type == "ntk"
    ):  # NTK-aware: stretch the base so the lowest frequency is interpolated by `factor`
        base = base * cfg.rope_factor ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if cfg.rope_type == "linear":  # position interpolation: positions / factor
        return inv_freq / cfg.rope_factor, 1.0
    if cfg.rope_type == "yarn":
        return _yarn(cfg, dim, base, exponents)
    # "dynamic" NTK equals the default inside max_position_embeddings, the range a static cache is sized for.
    return inv_freq, 1.0


def _yarn(cfg: DecoderConfig, dim: int, base: float, exponents: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as DeepSeek-V3 configures it: ramp between interpolated and original frequencies."""
    factor = cfg.rope_factor
    original = cfg.rope_original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / base**exponents
    interpolation = extrapolation / factor
    inv_freq = interpolation * ramp + extrapolation * (1 - ramp)
    attention_factor = cfg.rope_attention_factor
    if attention_factor is None:
        if cfg.rope_mscale and cfg.rope_mscale_all_dim:
            attention_factor = yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(
                factor, cfg.rope_mscale_all_dim
            )
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(Fp32Buffers):
    """Holds the frequencies (fp32 in every model dtype); `forward(position_ids)` gives the (cos, sin) pair all
    layers share."""

    fp32_buffers = ("inv_freq",)

    def __init__(self, cfg: DecoderConfig, device: torch.device | None = None) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # (B, 1, T, D/2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) of x (B, H, T, D) by the angles in cos/sin (B, 1, T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def last_positions(rope: tuple[torch.Tensor, torch.Tensor], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) pair of the last ``count`` positions (queries of a layer that keeps only those)."""
    cos, sin = rope
    return cos[:, :, -count:], sin[:, :, -count:]
