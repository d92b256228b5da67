"""Attention over several images packed into one sequence, each attending only to itself (block-diagonal).

Packing avoids padding every image to the longest one. On CUDA in half precision the FlashAttention varlen kernel
skips the off-diagonal blocks entirely; elsewhere each image gets its own SDPA call, which computes only the
diagonal blocks too: one masked call over the whole pack would compute (and hold) all (sum n)^2 scores, 3-6x
slower on a CPU for four images of 96-1024 patches, and its mask alone 17 GB for eight 16k-patch images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cu_seqlens_of(token_counts: list[int], device: torch.device) -> torch.Tensor:
    """``[0, n0, n0+n1, ...]`` as int32, the varlen kernels' segment boundaries."""
    counts = torch.tensor([0, *token_counts], dtype=torch.int32, device=device)
    return counts.cumsum(0, dtype=torch.int32)


def _varlen_kernel_usable(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def packed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token_counts: list[int]
) -> torch.Tensor:
    """Non-causal attention of ``(N, H, D)`` packed tensors, segment ``i`` being ``token_counts[i]`` long."""
    if _varlen_kernel_usable(query):
        from torch.nn.attention.varlen import varlen_attn

        cu_seqlens = cu_seqlens_of(token_counts, query.device)
        longest = max(token_counts)
        return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, longest, longest)
    out = [
        F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))  # (H, n, D)
        for q, k, v in zip(*(t.split(token_counts) for t in (query, key, value)), strict=True)
    ]
    return torch.cat(out, dim=1).transpose(0, 1)  # (H, N, D) -> (N, H, D)
