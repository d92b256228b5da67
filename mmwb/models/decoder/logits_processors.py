"""Logits processors with transformers' semantics, as plain functions on ``(N, V)`` float scores.

Each mirrors the transformers processor of the same name exactly (filter value ``-inf``, ``min_tokens_to_keep``,
tie handling), so a generation with mmwb and one with transformers agree token for token. They never modify
their input and never sync the host, except ``no_repeat_ngram`` which is vectorised the same way.
"""

from __future__ import annotations

import torch

FILTER_VALUE = -float("inf")


def temperature(scores: torch.Tensor, value: float) -> torch.Tensor:
    """Divide by ``value``; matches ``TemperatureLogitsWarper``."""
    return scores / value


def top_k(scores: torch.Tensor, k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep every token scoring at least the k-th best (ties kept); matches ``TopKLogitsWarper``."""
    k = min(max(k, min_tokens_to_keep), scores.size(-1))
    kth_best = torch.topk(scores, k)[0][..., -1, None]  # (N, 1)
    return scores.masked_fill(scores < kth_best, FILTER_VALUE)


def top_p(scores: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose cumulative mass is ``<= 1 - p``; matches
    ``TopPLogitsWarper`` (ascending sort, so the kept set is decided the same way on ties)."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - p)
    sorted_remove[..., -min_tokens_to_keep:] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    return scores.masked_fill(remove, FILTER_VALUE)


def min_p(scores: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens less likely than ``p`` times the most likely one; matches ``MinPLogitsWarper``."""
    probs = torch.softmax(scores, dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, keep, False)
    return scores.masked_fill(remove, FILTER_VALUE)


def repetition_penalty(
    scores: torch.Tensor, input_ids: torch.Tensor, penalty: float, ignore_before: torch.Tensor | None = None
) -> torch.Tensor:
    """Make every token already in ``input_ids`` less likely (negative scores times ``penalty``, positive ones
    divided by it); matches ``RepetitionPenaltyLogitsProcessor``. ``ignore_before`` (N,) skips the first
    positions of each row (left padding), like its ``prompt_ignore_length``."""
    vocab_size = scores.shape[-1]
    if ignore_before is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        input_ids = input_ids.masked_fill(positions[None, :] < ignore_before[:, None], vocab_size)
    # Ids outside the output vocabulary land in one extra column that is dropped afterwards.
    input_ids = input_ids.clamp(max=vocab_size)
    padded = torch.nn.functional.pad(scores, (0, 1))  # (N, V + 1)
    seen = torch.gather(padded, 1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, input_ids, seen)[..., :vocab_size]


def no_repeat_ngram(scores: torch.Tensor, input_ids: torch.Tensor, ngram_size: int) -> torch.Tensor:
    """Forbid every token that would repeat an n-gram already in ``input_ids``; matches
    ``NoRepeatNGramLogitsProcessor`` (vectorised: no per-row Python loop)."""
    cur_len = input_ids.shape[-1]
    if cur_len < ngram_size:
        return scores
    prefix = input_ids[:, cur_len + 1 - ngram_size :]  # (N, n - 1)
    windows = input_ids.unfold(dimension=1, size=ngram_size, step=1)  # (N, W, n)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # (N, W)
    vocab_size = scores.shape[-1]
    banned = scores.new_zeros((scores.shape[0], vocab_size + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab_size), vocab_size), True)
    return scores.masked_fill(banned[:, :vocab_size], FILTER_VALUE)
