"""Multi-head attention with grouped KV heads (MHA, GQA and MQA are the same code) on SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmwb.models.decoder.cache import KVCache
from mmwb.models.decoder.config import DecoderConfig
from mmwb.models.decoder.kernels.cpu import applies, gqa_attention
from mmwb.models.decoder.linear import Linear
from mmwb.models.decoder.norm import RMSNorm
from mmwb.models.decoder.rope import apply_rope, last_positions


class GroupedQueryAttention(nn.Module):
    """Llama/Mixtral/Qwen3 attention; Qwen3's per-head q/k RMSNorm when cfg.qk_norm."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.softmax_scale
        self.decode_max_tokens = cfg.decode_max_tokens
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        cache_position: int = 0,
        queries: int = 0,
    ) -> torch.Tensor:
        """``queries`` > 0: outputs for the last ``queries`` positions only (keys and values from all of ``x``)."""
        batch, length, _ = x.shape
        if (
            cache is not None
            and batch == length == 1 <= self.decode_max_tokens
            and mask is None
            and applies(x, cache.key)
        ):
            out = self._decode_on_cpu(x, rope, cache, cache_position)
            if out is not None:
                return self.o_proj(out.view(1, 1, -1))
        xq = x[:, -queries:] if queries else x
        q = self.q_proj(xq).view(batch, xq.shape[1], self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, *last_positions(rope, q.shape[2])), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, cache_position)  # (B, H_kv, S, D)
        if cache is not None and length <= self.decode_max_tokens:
            out = grouped_attention(q, k, v, mask, self.scale)
            return self.o_proj(out.transpose(1, 2).flatten(2))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and q.shape[2] > 1,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def probabilities(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], queries: torch.Tensor
    ) -> torch.Tensor:
        """The attention probabilities of the query positions ``queries (B, K)`` over the causal keys of a
        whole-sequence forward of ``x (B, T, C)`` (this layer's input, as ``forward`` gets it, no cache):
        ``(B, H, K, T)`` in fp32. What attention supervision reads; it repeats the q and k projections."""
        batch, length, _ = x.shape
        rows = torch.arange(batch, device=x.device)[:, None]
        q = self.q_proj(x[rows, queries]).view(batch, -1, self.num_heads, self.head_dim)  # (B, K, H, D)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        at_queries = [
            part.expand(batch, -1, -1, -1)[rows, 0, queries][:, None] for part in rope
        ]  # (B, 1, K, D/2)
        q = apply_rope(q.transpose(1, 2), *at_queries)  # (B, H, K, D)
        k = apply_rope(k.transpose(1, 2), *rope).repeat_interleave(self.num_heads // self.num_kv_heads, 1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale  # (B, H, K, T)
        causal = torch.arange(length, device=x.device)[None, None, :] <= queries[:, None, :, None]
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    def _decode_on_cpu(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, position: int
    ) -> torch.Tensor | None:
        """One token at batch 1 in one kernel call after the projections (None where it cannot run)."""
        q = self.q_proj(x).view(self.num_heads, self.head_dim)
        k = self.k_proj(x).view(self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return gqa_attention(q, k, v, rope, (cache.key, cache.value), position, self.scale)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention for a few new tokens over a cache without repeating KV heads.

    q (B, H, T, D), k (B, H_kv, S, D), v (B, H_kv, S, Dv), mask (B, 1, T, S) or None (causal) -> (B, H, T, Dv).
    The H / H_kv query heads sharing a KV head are folded into the rows of one matmul, so each cached key and
    value is read once per step (SDPA would expand the cache per query head).
    """
    batch, heads, length, _ = q.shape
    kv_heads = k.shape[1]
    folded = q.reshape(batch, kv_heads, heads // kv_heads * length, -1)  # (B, H_kv, rep * T, D)
    scores = torch.matmul(folded, k.transpose(-1, -2)).view(batch, heads, length, -1) * scale  # (B, H, T, S)
    if mask is None and length > 1:  # plain causal block at cache position 0
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype).view(batch, kv_heads, -1, scores.shape[-1])
    return torch.matmul(probs, v).view(batch, heads, length, -1)
