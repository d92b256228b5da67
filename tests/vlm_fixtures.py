"""A tiny random VLM (MoonViT + a projector + MoE decoder) and random images of given sizes, for the VLM tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import nn

from mmwb.data.tokenizer import IMAGE, train_bpe_tokenizer
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
from mmwb.models.vision import MoonViT, MoonViTConfig
from mmwb.models.vlm import VisionLanguageModel, VLMConfig

TEXTS = ["a red circle", "a blue square left of a green star", "what colour is the circle?", "yes", "no"] * 4
WIDTH = 32  # of the tower and of the decoder


def tiny_vlm(make_projector: Callable[[object], nn.Module]) -> VisionLanguageModel:
    """Seeded random parts; ``make_projector(tokenizer)`` joins the 32-wide tower to the 32-wide decoder."""
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    tower = MoonViT(MoonViTConfig(patch_size=4, hidden_size=WIDTH, num_layers=1, num_heads=2, intermediate_size=48,
                                  pos_emb_height=6, pos_emb_width=6))  # fmt: skip
    decoder = DecoderForCausalLM(DecoderConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        max_position_embeddings=512,
    ))  # fmt: skip
    cfg = VLMConfig(tokenizer.convert_tokens_to_ids(IMAGE))
    return VisionLanguageModel(cfg, tower, make_projector(tokenizer), decoder, tokenizer).eval()


def images(*sizes: tuple[int, int]) -> list[Image.Image]:
    """Seeded random RGB images of the given (width, height) sizes."""
    g = torch.Generator().manual_seed(0)
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
        for w, h in sizes
    ]
