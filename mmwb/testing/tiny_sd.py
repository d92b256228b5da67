"""Tiny random Stable Diffusion (1.x, 2.x or XL layout) + ControlNet checkpoints, built offline in seconds.

Tests, benchmarks and demos need real diffusers folders without downloading anything; these have the layout of
SD 1.x (CLIP text encoder, UNet, KL autoencoder), SD 2.x (the same with linear attention projections, per-block
head counts, upcast attention and v-prediction) or SDXL (two text encoders, size conditioning) at well under a
million parameters per part. The ControlNets' zero
convolutions are given random weights on purpose: a freshly initialised ControlNet adds exactly nothing, and a
parity test on one would not notice a ControlNet being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from mmwb.models.diffusion.schedulers import sd_scheduler
from mmwb.models.diffusion.shapes_sd import BOS, EOS

MAX_PROMPT_TOKENS = 77  # SD's text encoders read 77 positions; the tiny one keeps that so truncation is real
Layout = Literal["sd1", "sd2", "sdxl"]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte-level symbols, each also as a word end, and no merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = [BOS, EOS, *alphabet, *(f"{char}</w>" for char in alphabet)]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_PROMPT_TOKENS)


def tiny_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text encoder config matching ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_unet(layout: Layout) -> UNet2DConditionModel:
    """UNet with (32, 64) channels. SD 2.x's adds linear attention projections, a head count per block and
    upcast attention; the XL one reads two concatenated text encoders plus SDXL's size/crop conditioning (6 time
    ids x 8 + a 32-wide pooled text embedding = 80 extra inputs)."""
    options = {
        "sd1": {"cross_attention_dim": 32, "attention_head_dim": 4},
        "sd2": {
            "cross_attention_dim": 32,
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "sdxl": {
            "cross_attention_dim": 64,
            "attention_head_dim": 4,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "use_linear_projection": True,
        },
    }[layout]
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **options,
    )


def tiny_sd_pipeline(
    seed: int = 0, layout: Layout = "sd1"
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """An SD-shaped pipeline of ``layout`` with 32-wide text encoders and a VAE downsampling by 2."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
    )
    scheduler = sd_scheduler("v_prediction" if layout == "sd2" else "epsilon")
    parts = {
        "vae": vae,
        "text_encoder": CLIPTextModel(tiny_text_config(tokenizer)),
        "tokenizer": tokenizer,
        "unet": tiny_unet(layout),
        "scheduler": scheduler,
    }
    if layout == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer))
        return StableDiffusionXLPipeline(
            **parts, text_encoder_2=text_encoder_2, tokenizer_2=tiny_clip_tokenizer(), add_watermarker=False
        )
    return StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def tiny_controlnet(unet: UNet2DConditionModel, seed: int, scale: float = 0.1) -> ControlNetModel:
    """A ControlNet copied from ``unet`` whose zero convolutions hold N(0, scale²) weights instead of zeros."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [
        controlnet.controlnet_cond_embedding.conv_out,
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ]
    with torch.no_grad():
        for module in zero_convs:
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return controlnet


def save_tiny_controlnet_sd(
    out_dir: str | Path, n_controlnets: int = 1, seed: int = 0, layout: Layout = "sd1"
) -> tuple[Path, list[Path]]:
    """Write ``out_dir/sd`` and ``out_dir/controlnet_<i>`` as diffusers folders; return their paths."""
    out_dir = Path(out_dir)
    pipe = tiny_sd_pipeline(seed, layout)
    model_dir = out_dir / "sd"
    pipe.save_pretrained(model_dir)
    controlnet_dirs = []
    for index in range(n_controlnets):
        path = out_dir / f"controlnet_{index}"
        tiny_controlnet(pipe.unet, seed=seed + 1 + index).save_pretrained(path)
        controlnet_dirs.append(path)
    return model_dir, controlnet_dirs
