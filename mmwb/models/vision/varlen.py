"""Attention over several images packed into one sequence, each attending only to itself (block-diagonal).

Packing avoids padding every image to the longest one. On CUDA in half precision the FlashAttention varlen kernel
skips the off-diagonal blocks entirely; elsewhere one SDPA call with a block-diagonal boolean mask is used, which
is still a single batched kernel instead of a Python loop over images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cu_seqlens_of(token_counts: list[int], device: torch.device) -> torch.Tensor:
    """``[0, n0, n0+n1, ...]`` as int32, the varlen kernels' segment boundaries."""
    counts = torch.tensor([0, *token_counts], dtype=torch.int32, device=device)
    return counts.cumsum(0, dtype=torch.int32)


def block_diagonal_mask(token_counts: list[int], device: torch.device) -> torch.Tensor:
    """``(N, N)`` bool, True where query and key belong to the same image."""
    segment = torch.repeat_interleave(
        torch.arange(len(token_counts), device=device), torch.tensor(token_counts, device=device)
    )
    return segment[:, None] == segment[None, :]


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
    mask = None if len(token_counts) == 1 else block_diagonal_mask(token_counts, query.device)
    # (N, H, D) -> (1, H, N, D) for SDPA and back
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None], attn_mask=mask
    )
    return out[0].transpose(0, 1)
