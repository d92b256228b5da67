"""The one attention mask all layers share: causal over cache slots, minus padded slots."""

from __future__ import annotations

import torch

from mmwb.errors import MmwbInputError


def attention_mask_for(
    attention_mask: torch.Tensor | None, num_new: int, cache_position: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True where a query may attend; None when plain causal SDPA is exact.

    attention_mask is (B, S) with S = cache_position + T (1 = real token, 0 = padding). Each query may always see
    its own slot so rows of padding queries are never empty (their outputs are ignored, but must not be NaN).
    """
    total = cache_position + num_new
    if attention_mask is None and (cache_position == 0 or num_new == 1):
        return None
    slots = torch.arange(total, device=device)
    query_slots = slots[cache_position:, None]  # (T, 1)
    causal = slots[None, :] <= query_slots  # (T, S)
    if attention_mask is None:
        return causal[None, None]
    if attention_mask.shape[-1] != total:
        raise MmwbInputError(f"attention_mask has {attention_mask.shape[-1]} columns, expected {total}")
    allowed = causal[None] & attention_mask[:, None, :total].bool()  # (B, T, S)
    return (allowed | (slots[None, :] == query_slots)[None])[:, None]


def last_query_rows(
    mask: torch.Tensor | None, queries: int, total: int, device: torch.device
) -> torch.Tensor | None:
    """The mask of a layer that keeps only the last ``queries`` of ``total`` slots as queries: those rows of
    ``mask``, or for plain causal attention (None) the causal rows of the last slots (None again for a single
    query, which sees every slot)."""
    if mask is not None:
        return mask[:, :, -queries:]
    return attention_mask_for(None, queries, total - queries, device)


def positions_from_mask(
    attention_mask: torch.Tensor | None, batch: int, length: int, cache_position: int, device: torch.device
) -> torch.Tensor:
    """RoPE positions (B, T): count of real tokens before each slot, so left padding does not shift positions."""
    if attention_mask is None:
        return torch.arange(cache_position, cache_position + length, device=device).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -length:]
