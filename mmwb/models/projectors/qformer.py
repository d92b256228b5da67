"""InstructBLIP's Q-Former: a fixed number of learned queries summarise each image for the language model.

The queries self-attend together with the instruction tokens (so what they extract depends on the question),
cross-attend to the image features every ``cross_attention_frequency`` layers, and go through their own
feed-forward; the instruction tokens have a separate one. Post-LN BERT blocks, as in the published weights, so
``state_from_transformers`` can map an ``InstructBlipForConditionalGeneration`` state dict onto this module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from mmwb.errors import MmwbCheckpointError, MmwbInputError
from mmwb.models.vision.base import VisionFeatures


@dataclass
class QFormerConfig:
    vision_dim: int = 1408
    out_dim: int = 4096
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    num_queries: int = 32
    vocab_size: int = 30523
    max_positions: int = 512
    norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def for_vlm(
        cls, size: QFormerSize, vision_dim: int, out_dim: int, vocab_size: int, pad_token_id: int
    ) -> QFormerConfig:
        """A new Q-Former between a tower of width ``vision_dim`` and a language model of width ``out_dim`` whose
        tokenizer (``vocab_size`` ids) also writes the instructions."""
        return cls(vision_dim=vision_dim, out_dim=out_dim, vocab_size=vocab_size, pad_token_id=pad_token_id,
                   norm_eps=1e-6, **asdict(size))  # fmt: skip

    @classmethod
    def from_transformers(
        cls, qformer: Mapping[str, Any], num_queries: int, vision_dim: int, out_dim: int, where: str
    ) -> QFormerConfig:
        """The Q-Former of an InstructBLIP ``config.json`` (its ``qformer_config`` section), between a tower of
        width ``vision_dim`` and a language model of width ``out_dim``; ``where`` names the file in errors."""
        if qformer.get("hidden_act", "gelu") != "gelu":
            raise MmwbCheckpointError(
                f"{where}: Q-Former hidden_act {qformer['hidden_act']!r} (mmwb's is gelu)"
            )
        defaults = cls()
        try:
            return cls(
                vision_dim=vision_dim,
                out_dim=out_dim,
                hidden_size=int(qformer.get("hidden_size", 768)),
                num_layers=int(qformer.get("num_hidden_layers", 12)),
                num_heads=int(qformer.get("num_attention_heads", 12)),
                intermediate_size=int(qformer.get("intermediate_size", 3072)),
                cross_attention_frequency=int(qformer.get("cross_attention_frequency", 2)),
                num_queries=int(num_queries),
                vocab_size=int(qformer.get("vocab_size", 30522)),
                max_positions=int(qformer.get("max_position_embeddings", defaults.max_positions)),
                norm_eps=float(qformer.get("layer_norm_eps", defaults.norm_eps)),
                pad_token_id=int(qformer.get("pad_token_id") or 0),
            )
        except (TypeError, ValueError) as err:
            raise MmwbCheckpointError(f"{where}: unusable qformer_config ({err})") from err


@dataclass
class QFormerSize:
    """The shape of a Q-Former trained from scratch (a training config's ``qformer:`` section); its widths to the
    tower and to the language model come from those parts."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    cross_attention_frequency: int = 1
    num_queries: int = 16
    max_positions: int = 128


class _Attention(nn.Module):
    """Multi-head attention with BERT's post-LN residual: ``norm(x + dense(attn(x, context)))``."""

    def __init__(self, hidden: int, context_dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_dim, hidden)
        self.value = nn.Linear(context_dim, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, H, T, D); key_mask (B, S) bool -> (B, 1, 1, S)
        q, k, v = (
            proj(src).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for proj, src in ((self.query, x), (self.key, context), (self.value, context))
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.norm(x + self.dense(out.transpose(1, 2).flatten(2)))


class _FeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.fc_in = nn.Linear(hidden, intermediate)
        self.fc_out = nn.Linear(intermediate, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc_out(F.gelu(self.fc_in(x))))


class _Layer(nn.Module):
    def __init__(self, config: QFormerConfig, cross: bool) -> None:
        super().__init__()
        c = config
        self.self_attn = _Attention(c.hidden_size, c.hidden_size, c.num_heads, c.norm_eps)
        self.cross_attn = _Attention(c.hidden_size, c.vision_dim, c.num_heads, c.norm_eps) if cross else None
        self.query_ffn = _FeedForward(c.hidden_size, c.intermediate_size, c.norm_eps)
        self.text_ffn = _FeedForward(c.hidden_size, c.intermediate_size, c.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor,
        num_queries: int,
    ) -> torch.Tensor:
        x = self.self_attn(x, x, mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None:
            queries = self.cross_attn(queries, image, image_mask)
        return torch.cat([self.query_ffn(queries), self.text_ffn(text)], dim=1)


class QFormer(nn.Module):
    """Image features ``(B, N, vision_dim)`` (+ instruction ids) -> ``(B, num_queries, out_dim)`` tokens."""

    _no_split_modules = ["_Layer"]  # gathered as one unit by sharded training

    # the VLM passes each image's prompt tokens (see VisionLanguageModel.image_instructions)
    reads_instruction = True

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, c.num_queries, c.hidden_size))
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.layers = nn.ModuleList(
            [_Layer(c, cross=i % c.cross_attention_frequency == 0) for i in range(c.num_layers)]
        )
        self.language_projection = nn.Linear(c.hidden_size, c.out_dim)

    def forward(
        self,
        features: VisionFeatures,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> VisionFeatures:
        image, image_mask = _dense_with_mask(features)
        batch, device = image.shape[0], image.device
        queries = self.query_tokens.expand(batch, -1, -1)
        if instruction_ids is None:
            instruction_ids = torch.zeros(batch, 0, dtype=torch.long, device=device)
        if instruction_ids.shape[0] != batch:
            raise MmwbInputError(f"{instruction_ids.shape[0]} instructions for {batch} images")
        length = instruction_ids.shape[1]
        if length > self.config.max_positions:
            raise MmwbInputError(
                f"instruction of {length} tokens exceeds the Q-Former's {self.config.max_positions}"
            )
        text = self.word_embeddings(instruction_ids) + self.position_embeddings(
            torch.arange(length, device=device)
        )
        x = self.embed_norm(torch.cat([queries, text.to(queries.dtype)], dim=1))  # (B, Q+T, C)
        if instruction_mask is None:
            instruction_mask = torch.ones_like(instruction_ids)
        mask = torch.cat(
            [torch.ones(batch, queries.shape[1], dtype=torch.bool, device=device), instruction_mask.bool()], 1
        )
        for layer in self.layers:
            x = layer(x, mask, image, image_mask, queries.shape[1])
        tokens = self.language_projection(x[:, : queries.shape[1]])  # (B, Q, out)
        count = self.config.num_queries
        return VisionFeatures(tokens, [count] * batch, [(1, count)] * batch)


def _dense_with_mask(features: VisionFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, N, C)`` features and ``(B, N)`` bool mask; packed images are padded (only here, for cross-attention)."""
    if not features.packed:
        batch, count = features.features.shape[:2]
        return features.features, torch.ones(batch, count, dtype=torch.bool, device=features.features.device)
    image = pad_sequence(features.per_image(), batch_first=True)
    counts = torch.tensor(features.token_counts, device=image.device)
    return image, torch.arange(image.shape[1], device=image.device)[None] < counts[:, None]


_RENAMES = (
    (r"^query_tokens$", "query_tokens"),
    (r"^language_projection\.", "language_projection."),
    (r"^qformer\.embeddings\.word_embeddings\.", "word_embeddings."),
    (r"^qformer\.embeddings\.position_embeddings\.", "position_embeddings."),
    (r"^qformer\.embeddings\.layernorm\.", "embed_norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.attention\.", r"layers.\1.self_attn."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.dense."),
    (r"^qformer\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.self_attn.norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.", r"layers.\1.cross_attn."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"layers.\1.cross_attn.dense."),
    (r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"layers.\1.cross_attn.norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.intermediate_query\.dense\.", r"layers.\1.query_ffn.fc_in."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output_query\.dense\.", r"layers.\1.query_ffn.fc_out."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output_query\.LayerNorm\.", r"layers.\1.query_ffn.norm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.text_ffn.fc_in."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.text_ffn.fc_out."),
    (r"^qformer\.encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.text_ffn.norm."),
)


def name_from_transformers(key: str) -> str | None:
    """An InstructBLIP tensor name (with or without a ``model.`` prefix) -> its QFormer name; None: not a Q-Former
    tensor (the vision and language models')."""
    name = key.removeprefix("model.")
    for pattern, replacement in _RENAMES:
        renamed, hits = re.subn(pattern, replacement, name)
        if hits:
            return renamed
    return None


def state_from_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """InstructBLIP (transformers names, with or without a ``model.`` prefix) -> QFormer state dict."""
    out = {new: tensor for key, tensor in state.items() if (new := name_from_transformers(key)) is not None}
    if "query_tokens" not in out:
        raise MmwbCheckpointError("no query_tokens found: not an InstructBLIP Q-Former state dict")
    return out
