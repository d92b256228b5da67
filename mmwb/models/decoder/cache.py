"""Preallocated KV caches: new tokens are written at their slots, nothing is concatenated or re-expanded.

A GQA layer keeps keys and values per KV head; an MLA layer keeps only the compressed latent (kv_lora_rank values
after kv_a_layernorm) plus the shared RoPE key (qk_rope_head_dim), which is what makes MLA's cache small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmwb.models.decoder.config import DecoderConfig


@dataclass
class KVCache:
    """Static cache of one GQA layer; key (B, H_kv, S, D), value (B, H_kv, S, D)."""

    key: torch.Tensor
    value: torch.Tensor

    def update(
        self, key: torch.Tensor, value: torch.Tensor, position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the T new (B, H_kv, T, D) entries at [position, position + T); return the filled prefix."""
        end = position + key.shape[2]
        self.key[:, :, position:end] = key
        self.value[:, :, position:end] = value
        return self.key[:, :, :end], self.value[:, :, :end]

    def buffers(self) -> list[torch.Tensor]:
        return [self.key, self.value]


@dataclass
class LatentCache:
    """Static cache of one MLA layer; latent (B, 1, S, kv_lora_rank + qk_rope_head_dim)."""

    latent: torch.Tensor

    def update(self, latent: torch.Tensor, position: int) -> torch.Tensor:
        end = position + latent.shape[2]
        self.latent[:, :, position:end] = latent
        return self.latent[:, :, :end]

    def buffers(self) -> list[torch.Tensor]:
        return [self.latent]


@dataclass
class DecoderCache:
    """One cache entry per layer, all sized for `max_length` tokens."""

    layers: list[KVCache | LatentCache]
    max_length: int
    # the model's one-call decode plan over these buffers (mmwb.models.decoder.decode_plan), made at the first
    # decode step: None not yet, False where it does not apply
    decode_plan: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def allocate(
        cls, cfg: DecoderConfig, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype
    ) -> DecoderCache:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        if cfg.attention == "mla":
            width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
            layers = [LatentCache(zeros(batch_size, 1, max_length, width)) for _ in range(cfg.num_layers)]
        else:
            shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
            layers = [KVCache(zeros(*shape), zeros(*shape)) for _ in range(cfg.num_layers)]
        return cls(layers, max_length)

    def bytes_per_token(self) -> int:
        """Cache bytes one token costs across all layers (for one sequence of the batch)."""
        total = sum(b.numel() * b.element_size() for layer in self.layers for b in layer.buffers())
        return total // (self.max_length * self.batch_size)

    @property
    def batch_size(self) -> int:
        return self.layers[0].buffers()[0].shape[0]

    def reorder(self, beam_idx: torch.Tensor) -> DecoderCache:
        """Select batch rows in place of every buffer (beam search keeps the surviving beams)."""
        for layer in self.layers:
            for buf in layer.buffers():
                buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))
        return self


def cache_bytes_per_token(cfg: DecoderConfig, dtype: torch.dtype) -> int:
    """Bytes per cached token without allocating: MLA r + d_rope per layer, GQA 2 * H_kv * D per layer."""
    per_layer = (
        cfg.kv_lora_rank + cfg.qk_rope_head_dim
        if cfg.attention == "mla"
        else 2 * cfg.num_kv_heads * cfg.head_dim
    )
    return per_layer * cfg.num_layers * torch.empty((), dtype=dtype).element_size()
