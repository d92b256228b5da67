"""Multi-head Latent Attention (DeepSeek-V2/V3): keys and values come from one low-rank latent per token.

Two exact formulations of the same attention:
- expanded (training, prefill): kv_b_proj turns the latent into per-head keys/values, then plain SDPA;
- absorbed (cached decode): kv_b_proj's key half is folded into the query and its value half into the output, so
  attention runs directly on the cached latent (B, 1, S, r + d_rope) as one shared KV head; the cache is never
  re-expanded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmwb.models.decoder.attention import grouped_attention
from mmwb.models.decoder.cache import LatentCache
from mmwb.models.decoder.config import DecoderConfig
from mmwb.models.decoder.kernels.cpu import FP32_OR_BF16, applies, latent_attention
from mmwb.models.decoder.linear import Linear
from mmwb.models.decoder.norm import RMSNorm
from mmwb.models.decoder.rope import apply_rope, last_positions


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.decode_max_tokens = cfg.decode_max_tokens
        q_out = cfg.num_heads * (self.nope_dim + self.rope_dim)
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = Linear(
            cfg.hidden_size, self.kv_rank + self.rope_dim, bias=cfg.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_rank, cfg.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(cfg.num_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LatentCache | None = None,
        cache_position: int = 0,
        queries: int = 0,
    ) -> torch.Tensor:
        """``queries`` > 0: outputs for the last ``queries`` positions only (the latent from all of ``x``)."""
        batch, length, _ = x.shape
        decoding = cache is not None and length == 1 <= self.decode_max_tokens
        # the kernel checks kv_b itself
        if decoding and applies(x, self.kv_a_layernorm.weight, FP32_OR_BF16):
            out = self._decode_on_cpu(x, rope, mask, cache, cache_position)
            if out is not None:
                return self.o_proj(out.view(batch, 1, -1))
        xq = x[:, -queries:] if queries else x
        q = self._query(xq).view(batch, xq.shape[1], self.num_heads, -1).transpose(1, 2)  # (B, H, Tq, dn+dr)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, *last_positions(rope, q.shape[2]))
        kv_latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        kv_latent = self.kv_a_layernorm(kv_latent)[:, None]  # (B, 1, T, r)
        k_rope = apply_rope(k_rope[:, None], *rope)  # (B, 1, T, dr)
        latent = torch.cat((kv_latent, k_rope), dim=-1)  # (B, 1, T, r + dr)
        if cache is not None:
            latent = cache.update(latent, cache_position)  # (B, 1, S, r + dr)
        attend = self._absorbed if cache is not None and length <= self.decode_max_tokens else self._expanded
        out = attend(q_nope, q_rope, latent, mask)  # (B, H, Tq, dv)
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def _decode_on_cpu(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LatentCache,
        position: int,
    ) -> torch.Tensor | None:
        """One token per sequence, absorbed, in one kernel call after the projections (None where it cannot run)."""
        return latent_attention(
            self._query(x)[:, 0],
            self.kv_a_proj_with_mqa(x)[:, 0],
            self.kv_a_layernorm.weight,
            self.kv_a_layernorm.eps,
            rope,
            cache.latent,
            position,
            mask,
            self._kv_b_weight(),
            (self.num_heads, self.nope_dim, self.rope_dim, self.v_dim),
            self.scale,
        )

    def _kv_b_weight(self) -> torch.Tensor:
        """kv_b's (out, in) weight as the module applies it, so that absorbing it into the query and output stays
        exact when an adapter (peft LoRA, unmerged) wraps the projection."""
        if type(self.kv_b_proj) is Linear:
            return self.kv_b_proj.weight
        if hasattr(self.kv_b_proj, "derived"):  # int8/int4 (mmwb.models.quantize): dequantized once
            dtype = self.kv_a_layernorm.weight.dtype  # the layer's compute dtype
            # (out, r) row-major: the kernel reads each head's rows front to back
            make = lambda: self.kv_b_proj.dequantize().to(dtype)  # noqa: E731
            return self.kv_b_proj.derived(("kv_b", dtype), make)
        norm = self.kv_a_layernorm.weight  # never wrapped: the device and dtype the layer runs in
        identity = torch.eye(self.kv_rank, device=norm.device, dtype=norm.dtype)
        return self.kv_b_proj(identity).t()  # (out, r), column-major like the decode layout

    def _expanded(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, _, seq, _ = latent.shape
        kv_latent, k_rope = latent.split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(kv_latent[:, 0]).view(batch, seq, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (B, H, S, dn), (B, H, S, dv)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.num_heads, -1, -1)), dim=-1)
        qk_dim = q.shape[-1]
        if self.v_dim < qk_dim:  # SDPA's fused CPU/GPU kernels need equal head dims; zero columns are exact
            v = F.pad(v, (0, qk_dim - self.v_dim))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1, scale=self.scale
        )
        return out[..., : self.v_dim]

    def _absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        w_uk, w_uv_t = self._absorption_weights()  # (H, dn, r), (H, r, dv)
        q_latent = torch.matmul(q_nope, w_uk)  # (B, H, T, r): q_nope . (W_uk c) == (q_nope W_uk) . c
        q = torch.cat((q_latent, q_rope), dim=-1)  # (B, H, T, r + dr)
        out_latent = grouped_attention(
            q, latent, latent[..., : self.kv_rank], mask, self.scale
        )  # (B, H, T, r)
        return torch.matmul(out_latent, w_uv_t)  # (B, H, T, dv)

    def _absorption_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b's key half (H, dn, r) and transposed value half (H, r, dv). A quantized kv_b's halves are made
        once (until its weight is loaded or cast again), contiguous for batched matmuls: as strided views, bf16
        matmuls copied them on every decode step (4 MB a layer at Kimi-VL's widths)."""

        def halves(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            w = weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)
            w_uk, w_uv = w.split([self.nope_dim, self.v_dim], dim=1)  # (H, dn, r), (H, dv, r)
            return w_uk, w_uv.transpose(1, 2)

        if not hasattr(self.kv_b_proj, "derived"):
            return halves(self._kv_b_weight())
        dtype = self.kv_a_layernorm.weight.dtype
        weight = lambda: self.kv_b_proj.dequantize().to(dtype)  # noqa: E731
        contiguous = lambda: tuple(w.contiguous() for w in halves(weight()))  # noqa: E731
        return self.kv_b_proj.derived(("absorbed", dtype), contiguous)
